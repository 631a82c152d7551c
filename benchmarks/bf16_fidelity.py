"""How much of the unlearning a bf16 run applies, per optimizer, side by side.

A small LLaDA-shaped model (remote code, as LLaDA's) runs the same full-MDU
steps (forget batch, prompt-masked anchor, forward KL at tau 1, clipping,
warmup then cosine) from the same starting weights, once with fp32 weights and
torch's AdamW (the reference) and once with bf16 weights per optimizer of
`mdu_cli.train.optimizers`. The regime is scaled to an 8B run: weights rescaled to a
median |w| of 0.068 and lr 4e-5, so that an Adam step is about a sixth of half
a bf16 ulp, as lr 1e-5 on LLaDA-8B's |w| ~ 0.02 is; 120 steps.

Printed per run: the cosine and the norm ratio of its weight change against
the fp32 run's, the share of weights that changed, and optimizer-state bytes
per parameter. Also the fp32 result rounded to bf16: the best a bf16 file can
hold. Goal for the default bf16 optimizer: cosine >= 0.90, norm ratio 0.8-1.25.

    python benchmarks/bf16_fidelity.py [--steps 120] [--layers 2] [--d-model 256] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

MEDIAN_ABS_WEIGHT = 0.068
RUNS = ("adamw", "adamw-kahan", "adamw-sr", "adamw-8bit")


def _scaled_start(model) -> dict[str, torch.Tensor]:
    """The starting weights: every matrix rescaled to the target median |w|,
    then rounded to bf16, so that every run starts from the very same values."""
    start = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().float()
            if w.dim() == 2:
                w = w * (MEDIAN_ABS_WEIGHT / w.abs().median().clamp(min=1e-12))
            start[name] = w.to(torch.bfloat16).float()
    return start


def _run(model_dir: Path, start: dict, optimizer_name: str, dtype: torch.dtype, args) -> dict:
    from step_cost import make_batches, mdu_loss

    from mdu_cli.model.families import FAMILIES
    from mdu_cli.model.loading import load_model, resolve_source
    from mdu_cli.train.loop import lr_schedule
    from mdu_cli.train.optimizers import build, state_bytes
    from mdu_cli.train.run import frozen_copy

    source = resolve_source(str(model_dir))
    model = load_model(source, True, torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start[name])
    model = model.to(device=args.device, dtype=dtype)
    anchor = frozen_copy(model)  # the starting weights, frozen, as `mdu unlearn` makes its anchor
    family, mask_id = FAMILIES["llada"], source.config["mask_token_id"]
    forget, _ = make_batches(source.config["vocab_size"], args.batch, args.seq, args.prompt)
    forget = forget.to(args.device)
    params = [p for p in model.parameters()]
    optimizer, _ = build(optimizer_name, params, args.lr, 0.0, dtype)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(math.ceil(0.1 * args.steps), args.steps))
    noise = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(args.steps):
        mdu_loss(model, anchor, forget, mask_id, family, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    end = {name: p.detach().float().cpu() for name, p in model.named_parameters()}
    count = sum(p.numel() for p in params)
    return {"end": end, "state_bytes_per_param": state_bytes(optimizer) / count}


def _compare(delta: dict, reference: dict) -> dict:
    dot = sum(float((delta[n].double() * reference[n].double()).sum()) for n in reference)
    norm = math.sqrt(sum(float(delta[n].double().pow(2).sum()) for n in reference))
    ref_norm = math.sqrt(sum(float(reference[n].double().pow(2).sum()) for n in reference))
    changed = sum(int((delta[n] != 0).sum()) for n in reference)
    total = sum(reference[n].numel() for n in reference)
    return {"cosine": dot / (norm * ref_norm) if norm and ref_norm else 0.0,
            "norm_ratio": norm / ref_norm if ref_norm else 0.0, "changed": changed / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    from step_cost import add_shape_arguments

    add_shape_arguments(parser, layers=2, d_model=256, vocab=2048, batch=4, seq=64, prompt=16)
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", help="comma-separated optimizers to run (default: all installed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import importlib.util

    from step_cost import build_model

    torchao = importlib.util.find_spec("torchao") is not None
    runs = args.only.split(",") if args.only else [r for r in RUNS if torchao or r not in ("adamw-sr", "adamw-8bit")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llada-small"
        build_model(model_dir, args.layers, args.d_model, args.vocab)
        from mdu_cli.model.loading import load_model, resolve_source

        start = _scaled_start(load_model(resolve_source(str(model_dir)), True, torch.float32))
        reference = _run(model_dir, start, "adamw", torch.float32, args)
        ref_delta = {n: reference["end"][n] - start[n] for n in start}
        rows = {"fp32, adamw (reference)": {**_compare(ref_delta, ref_delta),
                                            "state_bytes_per_param": reference["state_bytes_per_param"]}}
        rounded = {n: reference["end"][n].to(torch.bfloat16).float() - start[n] for n in start}
        rows["fp32 result rounded to bf16"] = {**_compare(rounded, ref_delta), "state_bytes_per_param": None}
        for name in runs:
            result = _run(model_dir, start, name, torch.bfloat16, args)
            delta = {n: result["end"][n] - start[n] for n in start}
            rows[f"bf16, {name}"] = {**_compare(delta, ref_delta),
                                     "state_bytes_per_param": result["state_bytes_per_param"]}
    params = sum(t.numel() for t in start.values())
    if args.json:
        print(json.dumps({"params": params, "steps": args.steps, "lr": args.lr, "device": args.device,
                          "runs": rows}, indent=2))
        return
    print(f"LLaDA-shaped model, {params / 1e6:.2f}M parameters, median |w| {MEDIAN_ABS_WEIGHT}, lr {args.lr:g}, "
          f"{args.steps} steps of full MDU, {args.device}")
    print("| run | cosine vs fp32 | norm ratio | weights changed | optimizer bytes / param |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        state = "-" if row["state_bytes_per_param"] is None else f"{row['state_bytes_per_param']:.2f}"
        print(f"| {name} | {row['cosine']:.3f} | {row['norm_ratio']:.3f} | {100 * row['changed']:.0f}% | {state} |")


if __name__ == "__main__":
    main()
