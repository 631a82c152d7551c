"""The training loop of `mdu unlearn` and `mdu finetune`, written out (no Trainer).

`train(run)` takes a `TrainingRun` (built by keyword) and runs `_Loop`, which
holds the loop's state: set-up and resume in `__init__`; then per step
(`_step`) and micro-batch, the objective's loss (batch, mask, anchor forward,
conditional forward, loss: `_Losses.forget_loss`) and the retain loss (batch,
mask, forward, MDLM loss: `_Losses.retain_loss`), each with its backward; then
clip, step, log, save. With --optimizer-in-backward both losses go into one
backward, during which every parameter steps (mdu_cli/train/optimizers.py).
The objectives (MDU, the GA/NPO baselines, fine-tuning) are the registry's
(mdu_cli/methods/); the loop asks the config for its objective, never
branches on a method's name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from mdu_cli.config.training import TrainingConfig
from mdu_cli.data.tokenization import Example, collate
from mdu_cli.errors import Interrupted, MduError
from mdu_cli.methods.masking import NoisedBatch, noise_response, stack_rows
from mdu_cli.methods.objectives import mdlm_loss
from mdu_cli.model.families import Family, model_logits
from mdu_cli.train import optimizers
from mdu_cli.train.monitor import Probe, numeric_fields
from mdu_cli.train.resume import TrainingState, save_state, trainable_state

log = logging.getLogger("mdu")


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    optimizer: dict = field(default_factory=dict)  # the optimizer and its settings, for mdu_run.json

    def first_last(self, key: str) -> dict:
        values = [entry[key] for entry in self.history if entry.get(key) is not None]
        return {"first": values[0], "last": values[-1]} if values else {"first": None, "last": None}


def plan_steps(n_forget: int, cfg: TrainingConfig, generator: torch.Generator,
               processes: int = 1, n_retain: int = 0) -> list[list[list[int]]]:
    """Row indices for every optimizer step: steps -> micro-batches -> rows.

    An epoch is one shuffled pass over the forget set, cut into micro-batches of
    --batch-size, grouped --grad-accum x processes at a time (an epoch's last
    step may hold fewer). With several processes, every rank must run the same
    number of micro-batches, so a short last group is filled with the epoch's
    first micro-batches, as a distributed sampler pads. --max-steps, when set,
    replaces --epochs and runs as many passes as it needs.

    With --batch-accounting joint the pass is over forget and retain rows
    together: index i < n_forget is forget row i, i >= n_forget is retain row
    i - n_forget.
    """
    per_step = cfg.grad_accum * processes
    rows = n_forget + (n_retain if cfg.joint_accounting else 0)
    steps: list[list[list[int]]] = []
    epoch = 0
    while True:
        order = torch.randperm(rows, generator=generator).tolist()
        micro = [order[i:i + cfg.batch_size] for i in range(0, rows, cfg.batch_size)]
        for i in range(0, len(micro), per_step):
            group = micro[i:i + per_step]
            short = -len(group) % processes
            steps.append(group + (micro * (short // len(micro) + 1))[:short])
        epoch += 1
        if cfg.max_steps is not None:
            if len(steps) >= cfg.max_steps:
                return steps[:cfg.max_steps]
        elif epoch >= cfg.epochs:
            return steps


def lr_schedule(warmup: int, total: int):
    """The learning-rate factor of optimizer step k (0-based): linear warmup
    over `warmup` steps, then cosine decay over the rest.

    Unlike the usual schedule, no step gets a factor of 0: the first warmup
    step runs at 1/(warmup+1), and the last step of the decay stays above 0.
    A short run (--max-steps 1 with warmup) would otherwise take its only step
    at learning rate 0 and write an unchanged model.
    """
    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup)))

    return factor


def cycle_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless micro-batches from successive shuffled passes over n rows."""
    size = min(batch_size, n)
    pending: list[int] = []
    while True:
        if len(pending) < size:
            pending += torch.randperm(n, generator=generator).tolist()
        yield pending[:size]
        pending = pending[size:]


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, or the launcher
    passing Ctrl-C on to its workers) ask the loop to stop after the step in
    progress, save its state and exit; a second Ctrl-C stops at once. A flag
    rather than an exception: the step completes, so the saved state is
    exactly that of a step boundary, and in a multi-process run every rank
    agrees on the same boundary before the collective save."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool):
        self.signal: Optional[int] = None
        self.announce = announce
        self.previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            # os.write: the logging machinery is not safe inside a signal handler.
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after the current step to save the state "
                        "(press Ctrl-C again to stop at once, without saving)\n".encode())

    def agreed(self, accelerator) -> bool:
        """Whether any rank was asked to stop (collective when there are several)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


def is_sharded(accelerator) -> bool:
    """Whether the model is sharded over the processes (FSDP): its weights,
    gradients and optimizer state then go through full state dicts."""
    return accelerator.distributed_type.name == "FSDP"


def _check_finite(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise MduError(
            f"the {what} loss is {value} at step {step}; nothing was written. "
            "Lower --lr, or train in --dtype fp32"
        )


class _Losses:
    """The losses of one micro-batch, with their graphs, and their backward.

    Holds what every loss reads: the trainable model, the anchor, the method,
    the encoded data and the mask generator (whose draws, in order, are part
    of the run: the forget rows of a micro-batch are noised before its retain
    rows, whichever path computes them).
    """

    def __init__(self, run: "TrainingRun", model, device, noise_generator: torch.Generator, retain_batches):
        # `model` is the trainable model as accelerate wrapped it.
        self.model, self.anchor, self.forget, self.retain = model, run.anchor, run.forget, run.retain
        self.cfg, self.family, self.mask_token_id, self.pad_id = run.cfg, run.family, run.mask_token_id, run.pad_id
        # retain_batches: the endless stream of separate accounting, None
        # when retain rows come in the plan (joint) or not at all.
        self.device, self.noise_generator, self.retain_batches = device, noise_generator, retain_batches
        self.alpha = run.cfg.retain_weight
        self.joint = bool(self.retain) and self.alpha > 0 and run.cfg.joint_accounting
        self.method = run.cfg.objective()
        # A streamed anchor (--anchor-offload) serves a step's micro-batches
        # in one pass, possibly a step ahead (see _step_batches).
        self.streamed = hasattr(run.anchor, "submit")
        self._ahead = None
        self.boundary_noise = None

    def _noised(self, examples: Sequence[Example], rows: list[int]):
        return noise_response(collate([examples[i] for i in rows], self.pad_id).to(self.device),
                              self.mask_token_id, self.noise_generator)

    def _anchor_logits(self, anchor, forget_batch):
        return model_logits(anchor, self.method.anchor_input(forget_batch, self.mask_token_id),
                            forget_batch.attention_mask, self.family)

    def _anchor_view(self, forget_batch):
        """What the method's loss reads of the anchor (None for methods without one)."""
        if not self.method.needs_anchor:
            return None
        with torch.no_grad():
            # Keep only what the loss reads: the full-vocabulary logits
            # would otherwise live through the next forward and backward
            # (0.5 GB for LLaDA at 4 x 256 tokens).
            return self.method.anchor_view(self._anchor_logits(self.anchor, forget_batch), forget_batch,
                                           self.family)

    def _draw(self, micro_batches: list[list[int]]) -> list["_MicroBatch"]:
        """Every micro-batch of a step, its rows noised, in the order the
        loop has always drawn them (a micro-batch's forget rows, then its
        retain rows), so that drawing them all first changes no mask."""
        n_forget, drawn_apart = len(self.forget), []
        prepared = []
        for micro_rows in micro_batches:
            rows = [i for i in micro_rows if i < n_forget]
            if self.joint or self.cfg.optimizer_in_backward:
                drawn = [i - n_forget for i in micro_rows if i >= n_forget]
                if self.cfg.optimizer_in_backward and self.retain_batches is not None:
                    drawn = next(self.retain_batches)
            else:  # separate accounting: the retain rows come from their own stream
                drawn = next(self.retain_batches) if self.retain_batches is not None else drawn_apart
            forget_batch = self._noised(self.forget, rows) if rows else None
            retain_batch = self._noised(self.retain, drawn) if drawn else None
            prepared.append(_MicroBatch(rows, drawn, forget_batch, retain_batch))
        return prepared

    def _submit(self, prepared: list["_MicroBatch"]):
        """A streamed anchor's one pass for a step's forget micro-batches
        (model/streamed_anchor.py): its handle, or None for other anchors,
        which run micro-batch by micro-batch."""
        if not (self.streamed and self.method.needs_anchor):
            return None
        with_rows = [m for m in prepared if m.forget is not None]
        calls = [(lambda module, batch=m.forget: self.method.anchor_view(self._anchor_logits(module, batch), batch,
                                                                         self.family))
                 for m in with_rows]
        return with_rows, self.anchor.submit(calls)

    def _step_batches(self, micro_batches: list[list[int]], step: int,
                      upcoming: Optional[list[list[int]]]) -> list["_MicroBatch"]:
        """This step's micro-batches, noised, with a streamed anchor's views.
        A streamed anchor that runs ahead gets the next step's batches now
        (`upcoming`), drawn after this step's, so that its pass overlaps this
        step's training; the noise generator's state between the two draws is
        kept in `boundary_noise`, what a save after this step records."""
        if self._ahead is not None and self._ahead[0] == step:
            _, prepared, handle = self._ahead
        else:
            prepared = self._draw(micro_batches)
            handle = self._submit(prepared)
        self._ahead, self.boundary_noise = None, None
        if upcoming is not None and self.streamed and self.anchor.ahead and self.method.needs_anchor:
            self.boundary_noise = self.noise_generator.get_state()
            following = self._draw(upcoming)
            self._ahead = (step + 1, following, self._submit(following))
        if handle is not None:
            with_rows, pending = handle
            for m, view in zip(with_rows, pending.result()):
                m.anchor_view = view
        return prepared

    def _view(self, micro: "_MicroBatch"):
        if micro.anchor_view is not None:  # the streamed anchor's, from the step's pass
            view, micro.anchor_view = micro.anchor_view, None  # freed with its loss
            return view
        return self._anchor_view(micro.forget)

    def _retain_from_logits(self, logits: torch.Tensor, retain_batch) -> torch.Tensor:
        return mdlm_loss(logits, retain_batch, self.family.retain_weighting)

    def forget_loss(self, micro: "_MicroBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of forget rows: for MDU, pull the conditional prediction
        toward the anchor's prompt-masked prediction at every masked response
        position; the baselines (and fine-tuning) plug in their own anchor
        input and loss. Returns the loss and the masked count."""
        forget_batch = micro.forget
        anchor_view = self._view(micro)
        conditional_logits = model_logits(self.model, forget_batch.input_ids, forget_batch.attention_mask,
                                          self.family)
        forget_loss = self.method.loss(conditional_logits, anchor_view, forget_batch, self.family)
        del anchor_view, conditional_logits
        return forget_loss, forget_batch.masked.sum()

    def retain_loss(self, micro: "_MicroBatch") -> torch.Tensor:
        """The MDLM loss of retain rows, so that utility stays."""
        retain_batch = micro.retain
        logits = model_logits(self.model, retain_batch.input_ids, retain_batch.attention_mask, self.family)
        retain_loss = self._retain_from_logits(logits, retain_batch)
        del logits
        return retain_loss

    def in_one_forward(self, micro: "_MicroBatch"):
        """Forget and retain losses from one forward over both kinds of row,
        for --stack-forward (fewer launches) and --optimizer-in-backward. In
        backward it is needed: with a forward each, every parameter would be
        reached twice in the one backward, and autograd holds the first
        contribution for every parameter until the second arrives: a whole
        gradient's memory again (16 GB on LLaDA-8B, measured).
        Returns (forget loss or None, masked count, retain loss or None)."""
        forget_batch, retain_batch = micro.forget, micro.retain
        anchor_view = self._view(micro) if forget_batch is not None else None
        if forget_batch is not None and retain_batch is not None:
            both = stack_rows(forget_batch, retain_batch, self.pad_id)
        else:
            both = forget_batch if forget_batch is not None else retain_batch
        logits = model_logits(self.model, both.input_ids, both.attention_mask, self.family)
        forget_loss = retain_loss = None
        masked = torch.zeros((), device=self.device, dtype=torch.long)
        rows = len(micro.rows)
        if forget_batch is not None:
            forget_loss = self.method.loss(logits[:rows, :forget_batch.input_ids.shape[1]], anchor_view,
                                           forget_batch, self.family)
            masked = forget_batch.masked.sum()
        if retain_batch is not None:
            retain_loss = self._retain_from_logits(logits[rows:, :retain_batch.input_ids.shape[1]],
                                                   retain_batch)
        return forget_loss, masked, retain_loss

    def backward(self, micro_batches: list[list[int]], accelerator, step: int,
                 upcoming: Optional[list[list[int]]] = None) -> "_StepSums":
        """This rank's micro-batches of one step: each one's losses and
        backward (scaled so the step's gradient is the mean over them), with
        the sums the log reports. `upcoming`: the next step's micro-batches,
        for an anchor that runs ahead."""
        in_backward = self.cfg.optimizer_in_backward
        # One forward over both kinds of row: always in backward (see
        # in_one_forward), and with --stack-forward for fewer kernel launches.
        stacked = in_backward or self.cfg.stack_forward
        sums = _StepSums.zeros(self.device)
        for micro in self._step_batches(micro_batches, step, upcoming):
            if self.joint or stacked:
                # One backward per micro-batch, whatever mix of rows it
                # holds: every rank must run as many as the others (each
                # is a collective under DDP and FSDP), and in backward
                # every parameter steps during it, so it must hold the
                # whole step's loss.
                if stacked:
                    forget_loss, masked, retain_loss = self.in_one_forward(micro)
                    # Checked before backward: during it, the weights move.
                    if forget_loss is not None:
                        _check_finite(forget_loss.item(), "forget", step)
                    if retain_loss is not None:
                        _check_finite(retain_loss.item(), "retain", step)
                else:
                    forget_loss, masked = self.forget_loss(micro) if micro.forget is not None else (None, None)
                    retain_loss = self.retain_loss(micro) if micro.retain is not None else None
                total = None
                if forget_loss is not None:
                    total = forget_loss
                    sums.add_forget(forget_loss, masked)
                if retain_loss is not None:
                    total = self.alpha * retain_loss if total is None else total + self.alpha * retain_loss
                    sums.add_retain(retain_loss, micro.drawn)
                accelerator.backward(total / len(micro_batches))
                continue
            # Separate: a forget micro-batch, then a retain one, each
            # freed by its own backward before the next forward.
            forget_loss, masked = self.forget_loss(micro)
            accelerator.backward(forget_loss / len(micro_batches))
            sums.add_forget(forget_loss, masked)
            del forget_loss
            if micro.retain is not None:
                retain_loss = self.retain_loss(micro)
                accelerator.backward(self.alpha * retain_loss / len(micro_batches))
                sums.add_retain(retain_loss, micro.drawn)
                del retain_loss
        return sums


@dataclass
class _MicroBatch:
    """One micro-batch's rows, noised, and (from a streamed anchor) the
    anchor's view of its forget rows, computed with the step's others."""

    rows: list[int]                 # forget rows
    drawn: list[int]                # retain rows
    forget: Optional[NoisedBatch]   # the forget rows noised, None without any
    retain: Optional[NoisedBatch]   # the retain rows noised, None without any
    anchor_view: object = None      # a streamed anchor's view of `forget`, until its loss takes it


@dataclass
class _StepSums:
    """One rank's running sums over a step's micro-batches."""

    forget_total: torch.Tensor
    forget_micro: torch.Tensor   # micro-batches that held forget rows (all of them, unless joint)
    retain_total: torch.Tensor
    retain_micro: torch.Tensor
    masked_positions: torch.Tensor
    retain_rows: list[int]

    @classmethod
    def zeros(cls, device) -> "_StepSums":
        return cls(*(torch.zeros((), device=device) for _ in range(5)), retain_rows=[])

    def add_forget(self, loss: torch.Tensor, masked: torch.Tensor) -> None:
        self.forget_total += loss.detach()
        self.forget_micro += 1
        self.masked_positions += masked

    def add_retain(self, loss: torch.Tensor, rows: list[int]) -> None:
        self.retain_total += loss.detach()
        self.retain_micro += 1
        self.retain_rows += rows


def _build_optimizer(model, cfg: TrainingConfig, plan_length: int, optimizer_name: Optional[str]):
    """The optimizer over the trainable weights, its record, and the schedule."""
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    weight_dtype = trainable_params[0].dtype
    optimizer, choice = optimizers.build(
        optimizer_name or optimizers.resolve(cfg.optimizer, weight_dtype, cfg.optimizer_in_backward),
        trainable_params, cfg.lr, cfg.weight_decay, weight_dtype, cfg.optimizer_in_backward)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(math.ceil(cfg.warmup_ratio * plan_length), plan_length))
    return optimizer, choice, scheduler


def _restore(resume_from: TrainingState, model, optimizer, scheduler, noise_generator: torch.Generator,
             sharded: bool, rank: int, processes: int, state_dir: Optional[Path]) -> None:
    """Everything that decides the next step: weights, optimizer, schedule,
    and this rank's random states (the sharded weights and optimizer are
    restored after the wrap, by `_restore_sharded`)."""
    if resume_from.sharded != sharded:
        raise MduError("the saved state comes from a run " + ("under" if resume_from.sharded else "without")
                       + " FSDP; resume it with the same kind of launch")
    try:
        if not sharded:
            trainable = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in resume_from.trainable.items():
                    trainable[name].copy_(tensor)
            optimizers.load_state_dict(optimizer, resume_from.optimizer)
        scheduler.load_state_dict(resume_from.scheduler)
        if len(resume_from.generators["noise"]) != processes:
            raise MduError(f"the saved state comes from {len(resume_from.generators['noise'])} process(es); "
                           f"resume with the same number (this run has {processes})")
        noise_generator.set_state(resume_from.generators["noise"][rank])
        torch.set_rng_state(resume_from.torch_rng[rank])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:
        # Only an altered state gets here: the fingerprint matched the options.
        raise MduError(f"{state_dir}: the saved state does not fit this model ({type(err).__name__}); run "
                       "without --resume and with --overwrite to start over") from None


def _restore_sharded(resume_from: TrainingState, model, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    # Every rank read the whole state; each keeps its own shards of it.
    set_model_state_dict(model, resume_from.trainable, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, resume_from.optimizer, options=StateDictOptions(full_state_dict=True))


def _apply_update(model, optimizer, scheduler, stepper, accelerator, cfg: TrainingConfig,
                  step: int) -> tuple[float, float]:
    """Clip and step (or, in backward, read the norm of the step already
    taken), then move the schedule on. Returns (learning rate used, gradient norm)."""
    lr = float(scheduler.get_last_lr()[0])  # torchao keeps it as a tensor
    if stepper is not None:
        grad_norm = stepper.grad_norm()  # the step has been taken, parameter by parameter
        if not math.isfinite(grad_norm):
            raise MduError(f"the gradient is not finite at step {step} and was applied; nothing was "
                           "written. Lower --lr, or train in --dtype fp32")
    else:
        # --max-grad-norm 0: the norm is measured (and logged), nothing is clipped.
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf))
        if not math.isfinite(grad_norm):
            raise MduError(f"the gradient is not finite at step {step}; nothing was written. "
                           "Lower --lr, or train in --dtype fp32")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return lr, grad_norm


@dataclass
class TrainingRun:
    """What one run of the loop trains, on what, and where its records go;
    built by keyword (`train.run` builds it from a prepared run).

    `forget` holds the rows of the objective (the records to unlearn, or
    those `mdu finetune` trains on), `retain` the rows of the retain term."""

    model: torch.nn.Module
    anchor: Optional[torch.nn.Module]  # the frozen starting model; None for objectives without one
    forget: Sequence[Example]
    retain: Sequence[Example]
    cfg: TrainingConfig
    family: Family
    mask_token_id: int
    pad_id: int
    accelerator: Accelerator
    log_path: Optional[Path] = None
    show_progress: bool = True
    state_dir: Optional[Path] = None
    state_key: str = ""
    resume_from: Optional[TrainingState] = None
    probe: Optional[Probe] = None
    optimizer_name: Optional[str] = None


def train(run: TrainingRun) -> TrainResult:
    """Train `run.model` on its objective (MDU, a baseline, or fine-tuning),
    against `run.anchor`: the set-up in `_Loop.__init__`, then `_Loop.train`."""
    return _Loop(run).train()


class _Loop:
    """The loop's state, as a recipe holds it: the plan of steps and the random
    streams, the optimizer and schedule, the wrapped model, the history.

    In order: the plan and the streams; the optimizer and the schedule; the
    restored state (with --resume); accelerate's wrap. Then per step
    (`_step`): every micro-batch's losses and backward (`_Losses.backward`),
    the update (`_apply_update`), the log entry, and the periodic save or a
    requested stop."""

    def __init__(self, run: TrainingRun):
        self.run, cfg, accelerator = run, run.cfg, run.accelerator
        self.rank, self.processes = accelerator.process_index, accelerator.num_processes
        torch.manual_seed(cfg.seed)
        # The forget order is shared (each rank takes its own micro-batches of it);
        # retain draws and masks differ per rank, or every rank would repeat the others.
        order_generator = torch.Generator().manual_seed(cfg.seed)
        retain_generator = torch.Generator().manual_seed(cfg.seed + 1 + 1000 * self.rank)
        self.noise_generator = torch.Generator().manual_seed(cfg.seed + 2 + 1000 * self.rank)
        self.device = accelerator.device
        self.use_retain = bool(run.retain) and cfg.retain_weight > 0
        joint = self.use_retain and cfg.joint_accounting
        self.n_forget = len(run.forget)
        self.plan = plan_steps(self.n_forget, cfg, order_generator, self.processes, n_retain=len(run.retain))
        # Separate accounting draws retain rows from their own endless stream; joint
        # accounting finds them in the plan, beside the forget rows.
        retain_batches = (cycle_batches(len(run.retain), cfg.batch_size, retain_generator)
                          if self.use_retain and not joint else None)

        model = run.model
        optimizer, choice, self.scheduler = _build_optimizer(model, cfg, len(self.plan), run.optimizer_name)
        self.result = TrainResult(steps=len(self.plan), optimizer=choice.record())
        self.done = 0
        # Under FSDP each rank holds shards of the weights and of the optimizer:
        # the saved state goes through torch's full state dicts instead.
        self.sharded = is_sharded(accelerator)
        resume_from = run.resume_from
        if resume_from is not None:
            _restore(resume_from, model, optimizer, self.scheduler, self.noise_generator, self.sharded, self.rank,
                     self.processes, run.state_dir)
            self.done = resume_from.step
            self.result.history = list(resume_from.history)
            if retain_batches is not None:  # replayed: the stream is indices only
                for _ in range(sum(len(step[self.rank::self.processes]) for step in self.plan[:self.done])):
                    next(retain_batches)
        # The scheduler stays outside prepare(): accelerate would step it once per
        # process, while the plan already counts global steps.
        raw_optimizer = optimizer
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if resume_from is not None and self.sharded:
            _restore_sharded(resume_from, self.model, self.optimizer)
        # Stepping inside backward: each parameter's hook applies the optimizer
        # and frees its gradient; the loop then only steps the schedule.
        self.stepper = optimizers.StepInBackward(self.model, raw_optimizer) if cfg.optimizer_in_backward else None
        self.model.train()
        if run.anchor is not None:
            run.anchor.eval()
        self.losses = _Losses(run, self.model, self.device, self.noise_generator, retain_batches)
        # Random states as of the last completed step: an interrupt mid-step must
        # not save the draws of the step it abandoned.
        self.random_states = self._random_states()
        self.log_file = None
        self.trackers = bool(accelerator.log_with)
        self.forget_mean = 0.0  # the last step's, for the progress bar

    def _random_states(self) -> dict:
        # An anchor that runs ahead has drawn the next step's masks already:
        # the state that belongs to this step boundary is the one before them.
        noise = self.losses.boundary_noise
        return {"noise": noise if noise is not None else self.noise_generator.get_state(),
                "torch": torch.get_rng_state()}

    def train(self) -> TrainResult:
        run, cfg, plan = self.run, self.run.cfg, self.plan
        self.log_file = open(run.log_path, "w", encoding="utf-8") if run.log_path else None
        if self.log_file:
            self.log_file.writelines(json.dumps(entry) + "\n" for entry in self.result.history)
        bar = tqdm(total=len(plan), initial=self.done, desc=f"mdu {cfg.command}", unit="step",
                   disable=not run.show_progress, dynamic_ncols=True)
        self.start = time.perf_counter()
        stop = StopRequest(announce=run.accelerator.is_main_process)
        try:
            stop.__enter__()
            if run.probe is not None and self.done == 0:
                # Where the curve starts: the model as it came.
                self._record({"step": 0, "eval": run.probe(self.model, self.device)})
            for step, micro_batches in enumerate(plan, start=1):
                if step <= self.done:
                    continue
                entry = self._step(step, micro_batches)
                postfix = {"forget": f"{self.forget_mean:.4f}"}
                if self.use_retain:
                    postfix["retain"] = f"{entry['retain_loss']:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                self.done = step
                self.random_states = self._random_states()
                if cfg.save_every and step % cfg.save_every == 0 and step < len(plan):
                    self._save(step)
                # After the last step the run goes on to write its output instead.
                if step < len(plan) and stop.agreed(run.accelerator):
                    self._stop()
        finally:
            stop.__exit__()
            if hasattr(run.anchor, "close"):
                run.anchor.close()  # a pass still running ahead finishes first
            if self.stepper is not None:
                self.stepper.remove()
            bar.close()
            if self.log_file:
                self.log_file.close()
        return self.result

    def _step(self, step: int, micro_batches: list[list[int]]) -> dict:
        """One optimizer step: losses and backward, the update, the log entry."""
        run, cfg, accelerator = self.run, self.run.cfg, self.run.accelerator
        upcoming = self.plan[step][self.rank::self.processes] if step < len(self.plan) else None
        sums = self.losses.backward(micro_batches[self.rank::self.processes], accelerator, step, upcoming)
        # Every rank sees the same averaged losses, so a NaN stops all of
        # them together, before the optimizer could apply it.
        # Means over the step's micro-batches of all ranks; with joint
        # accounting a step can hold no forget (or no retain) row at all.
        totals = accelerator.reduce(torch.stack([sums.forget_total, sums.forget_micro, sums.retain_total,
                                                 sums.retain_micro]), reduction="sum").tolist()
        forget_mean, forget_seen = totals[0] / max(1.0, totals[1]), totals[1] > 0
        retain_mean = totals[2] / max(1.0, totals[3])
        _check_finite(forget_mean, "forget", step)
        _check_finite(retain_mean, "retain", step)
        lr, grad_norm = _apply_update(self.model, self.optimizer, self.scheduler, self.stepper, accelerator, cfg,
                                      step)
        alpha = cfg.retain_weight
        entry = {
            "step": step,
            "forget_loss": forget_mean if forget_seen else None,
            "retain_loss": retain_mean if self.use_retain else None,
            "lr": lr,
            "grad_norm": grad_norm,
            "masked_positions": int(accelerator.reduce(sums.masked_positions, reduction="sum").item()),
            "forget_rows": sum(1 for rows in micro_batches for i in rows if i < self.n_forget),
            # Indices, never content: which retain rows each process drew.
            "retain_rows": gather_object([sums.retain_rows]) if self.processes > 1 else [sums.retain_rows],
            "elapsed_s": round(time.perf_counter() - self.start, 3),
            "loss": (forget_mean if forget_seen else 0.0) + (alpha * retain_mean if self.use_retain else 0.0),
        }
        if run.probe is not None and (step % cfg.eval_every == 0 or step == len(self.plan)):
            entry["eval"] = run.probe(self.model, self.device)
        self._record(entry)
        self.forget_mean = forget_mean
        return entry

    def _record(self, entry: dict) -> None:
        """One entry to the history, the log file and the trackers."""
        self.result.history.append(entry)
        if self.log_file:
            self.log_file.write(json.dumps(entry) + "\n")
            self.log_file.flush()
        if self.trackers:
            self.run.accelerator.log(numeric_fields(entry), step=entry["step"])

    def _stop(self) -> None:
        """A requested stop after a completed step: save it, if there is a place, and leave."""
        total, state_dir = len(self.plan), self.run.state_dir
        if not state_dir:
            raise Interrupted(f"stopped after step {self.done} of {total}; nothing was saved")
        self._save(self.done)
        raise Interrupted(f"stopped after step {self.done} of {total}; the state is saved in {state_dir}. "
                          "Run the same command with --resume to continue")

    def _save(self, step: int) -> None:
        """The resumable state after `step`. Collective: every rank hands its
        random states to the main process, which alone writes (the weights and
        optimizer are the same on all; under FSDP their shards are gathered)."""
        run, accelerator = self.run, self.run.accelerator
        states = [self.random_states]
        if accelerator.num_processes > 1:
            states = gather_object([self.random_states])
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            # Collective: the shards are gathered to the main process (on the
            # host); frozen weights are left out, so a LoRA state stays small.
            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            trainable = {name: t.contiguous() for name, t in get_model_state_dict(self.model, options=options).items()}
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if run.state_dir is None or not accelerator.is_main_process:
            return
        if not self.sharded:
            trainable = trainable_state(accelerator.unwrap_model(self.model))
            optimizer_state = optimizers.state_dict(self.optimizer)
        save_state(run.state_dir, TrainingState(
            step=step, history=self.result.history, trainable=trainable, optimizer=optimizer_state,
            scheduler=self.scheduler.state_dict(), generators={"noise": [s["noise"] for s in states]},
            torch_rng=[s["torch"] for s in states], sharded=self.sharded,
        ), run.state_key)
