"""Full and LoRA MDU in bf16 on a GPU: step time and peak memory, measured.

Randomly initialised LLaDA-shaped models (the tests' remote-code fixture,
scaled up) run `mdu_cli.train.loop.train`, the loop `mdu unlearn` runs, with the
default bf16 optimizer (Kahan-compensated AdamW), a forget and a retain batch
of 4 x 256 tokens per step:

- a 1B model (d_model 2048, 16 layers): full MDU, with gradient
  checkpointing, with the optimizer step in backward, with the anchor on the
  host as well, and LoRA MDU;
- LLaDA-8B's shape (d_model 4096, 32 layers, vocabulary 126464): full MDU
  with gradient checkpointing, as is and with the memory levers, measured
  against what benchmarks/memory.py projects.

Peak memory is torch's peak of allocated tensors during training (weights,
anchor, optimizer state, gradients, activations), and what the caching
allocator reserved. Step time is the median over the steps after the first.
Beside it: tokens per second (forget and retain tokens trained on), the model
FLOPs utilisation (6 x parameters x trained tokens for the forward and
backward, 2 x more with checkpointing's recompute, 2 x parameters x forget
tokens for the anchor's forward; 4 instead of 6 for LoRA, which computes no
weight gradient of the base; over the device's dense bf16 peak, --peak-tflops),
and for the anchor on the host, the host-to-device GB/s its copies ran at and
the bytes a step moved. The last lines set the anchor-on-host step against
the same mode with the anchor in memory (the issue's goal: within 1.15x).

    python benchmarks/gpu_check.py [--out results.json] [--skip-8b] [--tiny] [--peak-tflops 989]

--tiny runs the same on a few-layer model, on the CPU if there is no GPU:
to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # step_cost, which finds the tests' fixtures

SHAPES = {
    "1b": {"d_model": 2048, "n_layers": 16, "n_heads": 16, "vocab_size": 32000},
    "8b": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 126464},
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512},
}
# (name, gradient checkpointing, in backward, anchor on the host, LoRA[, stacked forward[, compiled blocks]])
MODES_1B = [
    ("full MDU", False, False, False, False),
    ("full MDU, checkpointed", True, False, False, False),
    ("full MDU, checkpointed, in backward", True, True, False, False),
    ("full MDU, checkpointed, in backward, anchor on host", True, True, True, False),
    ("LoRA MDU (r 16)", False, False, False, True),
    ("full MDU, stacked forward", False, False, False, False, True),
    ("full MDU, stacked forward, compiled blocks", False, False, False, False, True, True),
]
MODES_8B = [
    ("full MDU, checkpointed, in backward, anchor on host", True, True, True, False),
    ("full MDU, checkpointed, in backward", True, True, False, False),
    ("full MDU, checkpointed", True, False, False, False),
    ("full MDU, checkpointed, stacked forward", True, False, False, False, True),
]


def build(directory: Path, shape: dict, device: str):
    """A LLaDA-shaped remote-code model initialised at random straight on the
    device, in bf16: nothing is written but its config and code."""
    from step_cost import write_config
    from transformers import AutoModel

    config = write_config(directory, shape["n_layers"], shape["d_model"], shape["vocab_size"], shape["n_heads"])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=torch.bfloat16)
    return model, config


def host_copy(model, config, device: str):
    """The anchor in host memory, as --anchor-offload keeps it (mdu's own
    offload_copy); the empty shell stands in for the second load from disk,
    since nothing is on disk here (the fixture has no buffers to fill)."""
    from transformers import AutoModel

    from mdu_cli.train.run import offload_copy

    with torch.device("meta"):
        shell = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=torch.bfloat16)
    return offload_copy(shell.to_empty(device="cpu"), model, device)


def examples(count: int, vocab: int, seq: int, prompt: int, seed: int):
    from mdu_cli.data.tokenization import Example

    gen = torch.Generator().manual_seed(seed)
    return [Example(tuple(torch.randint(0, vocab - 2, (prompt,), generator=gen).tolist()),
                    tuple(torch.randint(0, vocab - 2, (seq - prompt,), generator=gen).tolist()))
            for _ in range(count)]


# Dense bf16 peaks (TFLOP/s) of the GPUs this is run on, by name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device: str, given) -> "float | None":
    if given is not None or device != "cuda":
        return given
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def step_flops(params: int, forget_tokens: int, retain_tokens: int, checkpointed: bool, lora: bool) -> float:
    """Model FLOPs of one step: the trained forward and backward (and
    checkpointing's second forward), and the anchor's forward on the forget
    tokens (for LoRA the same model with the adapter off)."""
    per_token = (4 if lora else 6) + (2 if checkpointed else 0)
    return per_token * params * (forget_tokens + retain_tokens) + 2 * params * forget_tokens


def run_mode(accelerator, directory: Path, shape: dict, mode: tuple, steps: int, seq: int, device: str,
             peak: "float | None" = None) -> dict:
    from mdu_cli.config.training import UnlearnConfig
    from mdu_cli.model.checkpointing import enable_gradient_checkpointing
    from mdu_cli.model.families import FAMILIES
    from mdu_cli.model.lora import AdapterOffAnchor, apply_lora
    from mdu_cli.model.streamed_anchor import measure_bandwidth
    from mdu_cli.train.loop import TrainingRun, train
    from mdu_cli.train.run import frozen_copy

    name, checkpointed, in_backward, offload, lora, stacked, compiled = (*mode, False, False)[:7]
    started = time.perf_counter()
    model, config = build(directory, shape, device)
    params = sum(p.numel() for p in model.parameters())
    if lora:
        model = apply_lora(model, 16, 32.0, 0.0)
        anchor = AdapterOffAnchor(model)
    else:
        anchor = host_copy(model, config, device) if offload else frozen_copy(model)
        if offload:
            anchor.timed = True  # the copies' device time, for the GB/s below
    if checkpointed:
        enable_gradient_checkpointing(model)
    if compiled:
        from mdu_cli.model.compilation import compile_blocks

        compile_blocks(model)
    cfg = UnlearnConfig(model=str(directory), forget="forget", retain="retain", max_steps=steps, batch_size=4,
                        grad_accum=1, lr=1e-5, warmup_ratio=0.0, dtype="bf16", gradient_checkpointing=checkpointed,
                        optimizer_in_backward=in_backward, max_grad_norm=0.0 if in_backward else 1.0,
                        anchor_offload=offload, lora=lora, stack_forward=stacked, compile_blocks=compiled).resolved()
    forget = examples(4 * steps, shape["vocab_size"], seq, 64, 1)
    retain = examples(4 * steps, shape["vocab_size"], seq, 64, 2)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - started
    result = train(TrainingRun(model=model, anchor=anchor, forget=forget, retain=retain, cfg=cfg,
                               family=FAMILIES["llada"], mask_token_id=shape["vocab_size"] - 1, pad_id=0,
                               accelerator=accelerator, show_progress=False))
    elapsed = [entry["elapsed_s"] for entry in result.history]
    step_s = [b - a for a, b in zip(elapsed, elapsed[1:])]
    row = {"mode": name, "params_billions": round(params / 1e9, 3),
           "trainable_millions": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 1),
           "steps": steps, "step_s_median": round(statistics.median(step_s), 3) if step_s else None,
           "setup_s": round(setup_s, 1), "optimizer": result.optimizer,
           "forget_loss": result.first_last("forget_loss"), "retain_loss": result.first_last("retain_loss")}
    tokens = 4 * seq * 2  # a forget and a retain micro-batch of 4 rows per step
    if step_s:
        median = statistics.median(step_s)
        row["tokens_per_s"] = round(tokens / median, 1)
        flops = step_flops(params, 4 * seq, 4 * seq, checkpointed, lora)
        row["mfu"] = round(flops / median / (peak * 1e12), 4) if peak else None
    if offload:
        row["anchor_bytes_per_step"] = anchor.bytes_copied // steps
        row["anchor_h2d_gb_s"] = round(measure_bandwidth(anchor), 1) if device == "cuda" else None
        row["anchor_ahead"] = anchor.ahead
    if device == "cuda":
        row["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    del model, anchor, result
    accelerator.free_memory()  # drops the references prepare() kept
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON results, rewritten after every mode")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a few-layer model instead (checks the script)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for the MFU  "
                        "[default: by the GPU's name: " + ", ".join(f"{k} {v:g}" for k, v in PEAK_TFLOPS.items()) + "]")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no")
    peak = peak_tflops(device, args.peak_tflops)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "peak_tflops": peak,
              "batch": f"4 x {args.seq} forget + 4 x {args.seq} retain tokens per step", "runs": []}
    # The tiny check leaves out compiling (a minute of C++ on a CPU, for a script check).
    tiny_modes = [mode for mode in MODES_1B if not (mode + (False, False))[6]]
    plans = [("tiny", tiny_modes)] if args.tiny else [("1b", MODES_1B)] + ([] if args.skip_8b else [("8b", MODES_8B)])
    with tempfile.TemporaryDirectory() as tmp:
        for size, modes in plans:
            for mode in modes:
                try:
                    row = run_mode(accelerator, Path(tmp) / size, SHAPES[size], mode, args.steps, args.seq, device,
                                   peak)
                except torch.OutOfMemoryError as err:
                    row = {"mode": mode[0], "error": f"out of memory: {str(err).splitlines()[0]}"}
                    accelerator.free_memory()
                row["model"] = size
                report["runs"].append(row)
                Path(args.out).write_text(json.dumps(report, indent=2))
                print(json.dumps(row), flush=True)
    print("| model | mode | step (s) | tokens/s | MFU | anchor H2D GB/s | peak allocated GB | peak reserved GB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in report["runs"]:
        print(f"| {row['model']} | {row['mode']} | {row.get('step_s_median', '-')} | {row.get('tokens_per_s', '-')} | "
              f"{row.get('mfu') or '-'} | {row.get('anchor_h2d_gb_s') or '-'} | "
              f"{row.get('peak_allocated_gb', row.get('error', '-'))} | {row.get('peak_reserved_gb', '-')} |")
    for line in offload_ratios(report["runs"]):
        print(line)
    Path(args.out).write_text(json.dumps(report, indent=2))


def offload_ratios(runs: list[dict]) -> list[str]:
    """Each anchor-on-host row's step time over the same mode's with the anchor in memory."""
    lines = []
    for row in runs:
        if not row["mode"].endswith(", anchor on host") or not row.get("step_s_median"):
            continue
        same = next((r for r in runs if r["model"] == row["model"] and r.get("step_s_median")
                     and r["mode"] == row["mode"][:-len(", anchor on host")]), None)
        if same:
            ratio = row["step_s_median"] / same["step_s_median"]
            row["step_ratio_to_in_memory"] = round(ratio, 3)
            lines.append(f"{row['model']}: anchor on host {row['step_s_median']} s against in memory "
                         f"{same['step_s_median']} s a step: {ratio:.2f}x (goal: 1.15x)")
    return lines


if __name__ == "__main__":
    main()
