"""The frozen anchor of --anchor-offload: its weights in host memory, streamed
to the device block by block (docs/scale.md, "The anchor in host memory").

What the streaming does, and why:

- The weights of every transformer block, and of the input embeddings and
  the output head where the model names them (`get_input_embeddings`,
  `get_output_embeddings`) and they are not tied, are held in pinned host
  memory (on a CUDA device), so a copy runs at the link's speed,
  asynchronously. These are the streamed units, in the order a forward
  reaches them. The rest (final norm, tied embeddings) and every buffer stay
  on the device, moved once.
- The next block is copied on a side stream while the current one computes
  (double buffering: at most two blocks are on the device), and the compute
  stream waits on the copy's event, not on the host. No cache is flushed: a
  released block's memory goes back to the caching allocator, and the next
  copy reuses it.
- One pass serves many forwards: `forward_many` runs every forget micro-batch
  of an optimizer step through each block while that block is on the device,
  so a step moves one anchor's worth of bytes whatever --grad-accum is. Each
  forward runs in its own thread, and the threads take turns block by block
  (only one computes at a time), so every forward is exactly the computation
  it would be alone: the outputs equal the in-memory anchor's, bit for bit.
- The pass runs a step ahead (`submit`, on CUDA): the anchor is frozen, so
  the next step's anchor outputs depend only on its noised batches, which
  the loop draws in advance; the pass then runs in a background thread on
  its own CUDA stream while the current step trains, and its copies and
  forwards hide behind the training's compute instead of adding to it.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import torch

from mdu_cli.model.checkpointing import transformer_blocks


class _Aborted(Exception):
    """Another forward of the same pass failed: this one stops too."""


class _Turns:
    """Turn-taking between the threads of one pass: the thread that runs is
    the live one that has passed the fewest block boundaries (ties: the
    lowest index), so block i runs for forward 0, 1, ... before block i+1 runs
    for any of them."""

    def __init__(self, count: int):
        self.condition = threading.Condition()
        self.passed = [0] * count
        self.live = set(range(count))
        self.failed = False

    def _mine(self, k: int) -> bool:
        return self.failed or min(self.live, key=lambda j: (self.passed[j], j)) == k

    def wait(self, k: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self._mine(k))
            if self.failed:
                raise _Aborted

    def boundary(self, k: int) -> None:
        """Thread k reached a block: let the others catch up to it, then continue."""
        with self.condition:
            self.passed[k] += 1
            self.condition.notify_all()
        self.wait(k)

    def leave(self, k: int, failed: bool = False) -> None:
        with self.condition:
            self.live.discard(k)
            self.failed = self.failed or failed
            self.condition.notify_all()


class StreamedAnchor:
    """A frozen model whose transformer blocks live in host memory and are
    streamed to `device` for each pass. Call it like the model for one
    forward; `forward_many` runs several forwards in one pass.

    `bytes_copied` counts the host-to-device bytes moved so far; with
    `timed` set, `transfer_seconds()` gives the time the copies took on the
    device (CUDA only; benchmarks/gpu_check.py sets it: each copy then
    records two timing events)."""

    def __init__(self, module: torch.nn.Module, device, ahead: Optional[bool] = None):
        self.module = module.requires_grad_(False).eval()
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # Passes a step ahead, in the background: on CUDA, where they overlap
        # the training's kernels; the tests turn it on for the CPU too.
        self.ahead = self.cuda if ahead is None else ahead
        self._background: Optional[ThreadPoolExecutor] = None
        self._pass_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.units = _units(module, list(transformer_blocks(module, "--anchor-offload")))
        self.bytes_copied = 0
        self.timed = False
        self._timings: list[tuple[Any, Any]] = []
        in_blocks = {id(p) for block in self.units for p in block.parameters()}
        with torch.no_grad():
            # Everything outside the blocks, and every buffer, lives on the device.
            for p in module.parameters():
                if id(p) not in in_blocks:
                    p.data = p.data.to(self.device)
            for b in module.buffers():
                b.data = b.data.to(self.device)
            # The blocks' weights in (pinned) host memory, tensor by tensor, so
            # the host never holds a second copy of the model.
            self._host = []
            for block in self.units:
                params = list(block.parameters())
                for p in params:
                    p.data = p.data.to("cpu").pin_memory() if self.cuda else p.data.to("cpu")
                self._host.append([(p, p.data) for p in params])
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: dict[int, Any] = {}      # block -> the event its copy records (None on the CPU)
        self._waited: set[int] = set()         # blocks the compute stream has waited for
        self._arrivals = [0] * len(self.units)
        self._local = threading.local()
        self._turns: Optional[_Turns] = None
        self._forwards = 0
        for i, block in enumerate(self.units):
            block.register_forward_pre_hook(self._before(i))
            block.register_forward_hook(self._after(i))

    # The model's side, as the training loop calls an anchor.
    def eval(self) -> "StreamedAnchor":
        return self

    def __call__(self, *args, **kwargs):
        return self.forward_many([lambda module: module(*args, **kwargs)])[0]

    @property
    def config(self):
        return self.module.config

    def pass_bytes(self) -> int:
        """One pass's worth of host-to-device bytes: every streamed unit's weights."""
        return sum(t.numel() * t.element_size() for block in self._host for _, t in block)

    def transfer_seconds(self) -> float:
        """Device time spent copying so far (0.0 on the CPU)."""
        if not self.cuda:
            return 0.0
        torch.cuda.synchronize(self.device)
        return sum(start.elapsed_time(end) for start, end in self._timings) / 1000

    def submit(self, calls: Sequence[Callable[[torch.nn.Module], Any]]):
        """`forward_many(calls)` in the background (with `ahead`; at once
        otherwise). `.result()` gives the outputs, ready for the caller's
        stream: it waits for the pass's stream to finish them."""
        if not self.ahead:
            done: Future = Future()
            done.set_result((self.forward_many(calls), None))
            return _Ready(done, self)
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdu-anchor")
        inputs = None
        if self.cuda:
            # The calls' inputs were made on the caller's stream: the pass's
            # stream must not read them before that stream has written them.
            inputs = torch.cuda.Event()
            inputs.record(torch.cuda.current_stream(self.device))
        return _Ready(self._background.submit(self._pass_on_own_stream, calls, inputs), self)

    def _pass_on_own_stream(self, calls, inputs):
        if not self.cuda:
            return self.forward_many(calls), None
        with _on(self._pass_stream, self.device):
            self._pass_stream.wait_event(inputs)
            results = self.forward_many(calls, stream=self._pass_stream)
            event = torch.cuda.Event()
            event.record(self._pass_stream)
        return results, event

    def close(self) -> None:
        if self._background is not None:
            self._background.shutdown(wait=True)
            self._background = None

    def forward_many(self, calls: Sequence[Callable[[torch.nn.Module], Any]], stream=None) -> list:
        """Run `call(module)` for each call in one streamed pass: each block
        is copied to the device once and serves every call before it is
        released. Returns the calls' results, in order."""
        count = len(calls)
        if count == 0:
            return []
        self._turns, self._forwards = _Turns(count), count
        self._arrivals = [0] * len(self.units)
        results: list = [None] * count
        errors: list = [None] * count
        threads = torch.get_num_threads()
        if self.units:
            self._fetch(0)  # the first block's copy starts before any forward reaches it

        def work(k: int) -> None:
            self._local.index = k
            failed = False
            try:
                # The intra-op thread count and the current CUDA stream are
                # per thread in torch: a worker gets the caller's, so its
                # kernels are the same, on the stream asked for. The anchor
                # is frozen: no graph, whatever the caller's grad mode.
                torch.set_num_threads(threads)
                with torch.no_grad(), _on(stream, self.device):
                    self._turns.wait(k)
                    results[k] = calls[k](self.module)
            except _Aborted:
                failed = True
            except BaseException as err:  # re-raised in the caller below
                errors[k], failed = err, True
            finally:
                self._turns.leave(k, failed)

        try:
            if count == 1:
                work(0)  # no other forward to take turns with
            else:
                workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(count)]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
        finally:
            self._release_all()
            self._turns = None
        for err in errors:
            if err is not None:
                raise err
        return results

    # Streaming.
    def _before(self, i: int):
        def hook(module, args):
            turns = self._turns
            if turns is None:
                raise RuntimeError("a streamed anchor runs through StreamedAnchor, not its module")
            turns.boundary(self._local.index)
            if i not in self._ready:
                self._fetch(i)
            if self._arrivals[i] == 0 and i + 1 < len(self.units) and i + 1 not in self._ready:
                self._fetch(i + 1)  # copied while this block computes
            event = self._ready[i]
            if event is not None and i not in self._waited:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)  # the device waits for the copy; the host does not
                for param, _ in self._host[i]:
                    # The copy stream allocated it: keep the allocator from
                    # handing it out again before this stream is done with it.
                    param.data.record_stream(stream)
                self._waited.add(i)
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            self._arrivals[i] += 1
            if self._arrivals[i] == self._forwards:
                self._release(i)
        return hook

    def _fetch(self, i: int) -> None:
        params = self._host[i]
        self.bytes_copied += sum(t.numel() * t.element_size() for _, t in params)
        if not self.cuda:
            for param, host in params:
                param.data = host.clone()  # the CPU stands in for the device: the same copy, counted
            self._ready[i] = None
            return
        start, end = torch.cuda.Event(enable_timing=self.timed), torch.cuda.Event(enable_timing=self.timed)
        with torch.cuda.stream(self._copy_stream):
            start.record()
            for param, host in params:
                param.data = host.to(self.device, non_blocking=True)
            end.record()
        if self.timed:
            self._timings.append((start, end))
        self._ready[i] = end

    def _release(self, i: int) -> None:
        for param, host in self._host[i]:
            param.data = host
        self._ready.pop(i, None)
        self._waited.discard(i)

    def _release_all(self) -> None:
        for i in list(self._ready):
            self._release(i)


def measure_bandwidth(anchor: StreamedAnchor) -> float:
    """Host-to-device GB/s of the copies so far (CUDA only; 0.0 otherwise)."""
    seconds = anchor.transfer_seconds()
    return anchor.bytes_copied / seconds / 1e9 if seconds > 0 else 0.0


def _units(module, blocks: list) -> list:
    """What streams, in the order a forward runs it: the input embeddings, the
    blocks, the output head. The embeddings and the head only where the model
    names them, they own their weights (not inside a block), and they share
    none with each other (tied weights are read at both ends: they stay)."""
    def named(getter):
        try:
            found = getter()
        except (AttributeError, NotImplementedError):
            return None
        return found if isinstance(found, torch.nn.Module) and any(True for _ in found.parameters()) else None

    embeddings, head = named(module.get_input_embeddings), named(module.get_output_embeddings)
    inside = {id(p) for block in blocks for p in block.parameters()}
    ends = [m for m in (embeddings, head) if m is not None and not any(id(p) in inside for p in m.parameters())]
    if len(ends) == 2 and {id(p) for p in ends[0].parameters()} & {id(p) for p in ends[1].parameters()}:
        ends = []
    first = [embeddings] if embeddings in ends else []
    last = [head] if head in ends else []
    return first + blocks + last


@contextlib.contextmanager
def _on(stream, device):
    """`stream` current, on its device, in this thread (a new thread starts
    on device 0 and its default stream); nothing without a stream."""
    if stream is None:
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(stream):
        yield


class _Ready:
    """A background pass's outputs: `result()` waits for the pass, then makes
    the caller's CUDA stream wait for the pass's stream, and marks every
    output tensor as used there (so the allocator does not reuse its memory
    for the pass's stream while the caller still reads it)."""

    def __init__(self, inner: Future, anchor: StreamedAnchor):
        self.inner, self.anchor = inner, anchor

    def result(self) -> list:
        results, event = self.inner.result()
        if event is not None:
            stream = torch.cuda.current_stream(self.anchor.device)
            stream.wait_event(event)
            for tensor in _tensors(results):
                tensor.record_stream(stream)
        return results


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
