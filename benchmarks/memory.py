"""Peak memory of full MDU (with and without gradient checkpointing, and with
the optimizer step inside backward), LoRA MDU and LoRA plain MDLM
fine-tuning, side by side.

On one LLaDA-shaped model of about 100M parameters (CPU, fp32, batch
4 x 256 tokens, forget + retain batch per step), each mode runs two optimizer
steps in a fresh child process, whose peak RSS (VmHWM, Linux) is read against
its RSS before the model was loaded. LoRA MDU's only extra over LoRA
fine-tuning is one no-grad forward of the forget batch (the adapter-off
anchor), so the target is LoRA MDU <= 1.15 x LoRA fine-tuning.

    python benchmarks/memory.py [--layers 12] [--d-model 640] [--vocab 32000]

It also prints the GPU memory each mode needs for LLaDA-8B in bf16, projected
from the parameter counts (weights, gradients, AdamW states, anchor copy)
plus the activation share measured here, scaled by hidden size and depth.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

MODES = ("full_mdu", "full_mdu_checkpointed", "full_mdu_in_backward", "lora_mdu", "lora_finetune")


def _child(mode: str, model_dir: str, args: dict, queue) -> None:
    import torch
    from step_cost import _proc_status_mb, make_batches, mdlm_batch_loss, mdu_loss

    from mdu_cli.methods.masking import anchor_input_ids, noise_response
    from mdu_cli.methods.objectives import mdlm_loss, mdu_forget_loss
    from mdu_cli.model.families import FAMILIES, model_logits
    from mdu_cli.model.loading import load_model, resolve_source
    from mdu_cli.model.lora import AdapterOffAnchor, apply_lora
    from mdu_cli.train.run import frozen_copy

    torch.manual_seed(0)
    baseline = _proc_status_mb("VmRSS")
    source = resolve_source(model_dir)
    model = load_model(source, True, torch.float32)
    family, mask_id = FAMILIES["llada"], source.config["mask_token_id"]
    if mode.startswith("full_mdu"):
        anchor = frozen_copy(model)
        if mode in ("full_mdu_checkpointed", "full_mdu_in_backward"):
            from mdu_cli.model.checkpointing import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
    else:
        model = apply_lora(model, 16, 32, 0.0)
        anchor = AdapterOffAnchor(model) if mode == "lora_mdu" else None
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_backward = mode == "full_mdu_in_backward"
    if in_backward:
        # What --optimizer-in-backward runs: torch-optimi's AdamW (fp32 here,
        # so no compensation buffer: the same 8 bytes of state as torch's).
        from mdu_cli.train import optimizers

        optimizer, _ = optimizers.build("adamw-kahan", trainable, 1e-5, 0.0, torch.float32, in_backward=True)
        optimizers.StepInBackward(model, optimizer)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    forget, retain = make_batches(source.config["vocab_size"], args["batch"], args["seq"], args["prompt"])
    noise = torch.Generator().manual_seed(1)

    def mdlm(batch):
        return mdlm_batch_loss(model, batch, mask_id, family, noise)

    def mdu_in_backward():
        """The step --optimizer-in-backward takes: forget and retain rows in
        one forward, so each parameter's gradient arrives in one piece."""
        from mdu_cli.methods.masking import stack_rows

        noised, kept = noise_response(forget, mask_id, noise), noise_response(retain, mask_id, noise)
        with torch.no_grad():
            anchor_view = model_logits(anchor, anchor_input_ids(noised, mask_id), noised.attention_mask,
                                       family)[noised.masked]
        both = stack_rows(noised, kept, 0)
        logits = model_logits(model, both.input_ids, both.attention_mask, family)
        rows = noised.input_ids.shape[0]
        loss = mdu_forget_loss(logits[:rows], anchor_view, noised.masked, tau=1.0) + mdlm_loss(logits[rows:], kept)
        del logits, anchor_view
        loss.backward()

    for _ in range(2):
        if in_backward:
            mdu_in_backward()
            continue
        if mode == "lora_finetune":
            mdlm(forget).backward()
        else:
            mdu_loss(model, anchor, forget, mask_id, family, noise).backward()
        mdlm(retain).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _proc_status_mb("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    queue.put({"mode": mode, "peak_mb": peak, "training_mb": peak - baseline,
               "trainable": sum(p.numel() for p in trainable), "params": params,
               "largest_tensor": max(p.numel() for p in model.parameters())})


# Bytes per parameter of full MDU on bf16 weights, per optimizer and memory
# lever: (mode, weights, frozen anchor, gradients, optimizer state, in backward).
# The optimizer states are those mdu_cli.train.optimizers builds (measured by
# benchmarks/bf16_fidelity.py: 4, 6 and 2.04 bytes a parameter). In backward
# no full gradient exists: only the tensor being stepped holds one, at most
# the largest (LLaDA-8B's 126464 x 4096 embedding: 1.04 GB in bf16).
FULL_MDU_MODES = [
    ("adamw (bf16 states; drops most updates)", 2, 2, 2, 4, False),
    ("adamw-kahan (default for bf16)", 2, 2, 2, 6, False),
    ("adamw-8bit + stochastic rounding", 2, 2, 2, 2.04, False),
    ("adamw-kahan + anchor on the host (--anchor-offload)", 2, 0, 2, 6, False),
    ("adamw-8bit + stochastic rounding + anchor on the host", 2, 0, 2, 2.04, False),
    ("adamw-kahan + --optimizer-in-backward", 2, 2, 0, 6, True),
    ("adamw-kahan + --anchor-offload + --optimizer-in-backward", 2, 0, 0, 6, True),
]
LLADA_LARGEST_TENSOR = 126464 * 4096
GPUS_GB = (("80 GB (A100/H100)", 80), ("96 GB (H100 NVL)", 96), ("141 GB (H200)", 141))


def full_mdu_breakdown(n_params: float, activations_gb: float, in_backward_activations_gb: float) -> list[dict]:
    """Each mode's projection. "Fits" leaves 5% of the card for the CUDA
    context and the allocator's fragmentation."""
    rows = []
    for mode, weights, anchor, grads, state, in_backward in FULL_MDU_MODES:
        activations = in_backward_activations_gb if in_backward else activations_gb
        transient = LLADA_LARGEST_TENSOR * 2 / 1e9 if in_backward else 0.0
        total = n_params * (weights + anchor + grads + state) / 1e9 + activations + transient
        fits = next((name for name, size in GPUS_GB if total <= size * 0.95), "none listed")
        rows.append({"mode": mode, "weights": weights, "anchor": anchor, "gradients": grads,
                     "gradient_transient_gb": round(transient, 2), "optimizer": state,
                     "activations_gb": activations, "total_gb": total, "fits": fits})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from step_cost import add_shape_arguments

    add_shape_arguments(parser, layers=12, d_model=640, vocab=32000, batch=4, seq=256, prompt=64)
    parser.add_argument("--glibc-cache", action="store_true",
                        help="measure with glibc's default heap caching (peak RSS then includes freed memory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from step_cost import build_model

    # Large blocks straight from mmap, so that what is freed leaves the RSS:
    # otherwise glibc keeps freed heap memory and the peak RSS measures its
    # cache (the no-grad anchor pass then looks like +20%) instead of live tensors.
    if not args.glibc_cache:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    shape = {"batch": args.batch, "seq": args.seq, "prompt": args.prompt}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llada-100m"
        build_model(model_dir, args.layers, args.d_model, args.vocab)
        ctx = mp.get_context("spawn")
        for mode in MODES:
            queue = ctx.Queue()
            child = ctx.Process(target=_child, args=(mode, str(model_dir), shape, queue))
            child.start()
            results[mode] = queue.get()
            child.join()

    params = results["full_mdu"]["params"]
    ratio = results["lora_mdu"]["training_mb"] / results["lora_finetune"]["training_mb"]
    # Projection for LLaDA-8B in bf16 (2 bytes a parameter; AdamW states in the
    # weights' dtype, as a bf16 run keeps them). Activations scale with
    # d_model x layers x tokens; the share measured here is scaled by that.
    llada_params, gb = 8.016e9, 1e9
    weights = llada_params * 2 / gb
    lora_trainable = results["lora_mdu"]["trainable"] / params * llada_params
    measured_weights_mb = params * 4 / 1e6
    act_full = max(0.0, results["full_mdu"]["training_mb"] - 5 * measured_weights_mb)  # w, g, 2 adam, anchor
    act_full_ckpt = max(0.0, results["full_mdu_checkpointed"]["training_mb"] - 5 * measured_weights_mb)
    # In backward: weights, 2 adam states and the anchor, and one gradient at a
    # time (the largest tensor at most); the one forward's graph in the rest.
    largest_mb = results["full_mdu_in_backward"]["largest_tensor"] * 4 / 1e6
    act_in_backward = max(0.0, results["full_mdu_in_backward"]["training_mb"] - 4 * measured_weights_mb - largest_mb)
    act_lora_mdu = max(0.0, results["lora_mdu"]["training_mb"] - measured_weights_mb)
    act_lora_ft = max(0.0, results["lora_finetune"]["training_mb"] - measured_weights_mb)
    scale = (4096 * 32) / (args.d_model * args.layers) / 2  # bf16 activations are half of fp32 ones
    projection = {
        "full_mdu": 5 * weights + act_full * scale / 1e3,
        "full_mdu_checkpointed": 5 * weights + act_full_ckpt * scale / 1e3,
        "full_mdu_in_backward": 4 * weights + LLADA_LARGEST_TENSOR * 2 / gb + act_in_backward * scale / 1e3,
        "lora_mdu": weights + lora_trainable * 2 * 4 / gb + act_lora_mdu * scale / 1e3,
        "lora_finetune": weights + lora_trainable * 2 * 4 / gb + act_lora_ft * scale / 1e3,
    }
    # The goal is stated with gradient checkpointing on: the breakdown uses its activations.
    breakdown = full_mdu_breakdown(llada_params, act_full_ckpt * scale / 1e3, act_in_backward * scale / 1e3)
    report = {"params_millions": round(params / 1e6, 1), "batch": shape, "modes": results,
              "lora_mdu_over_lora_finetune": round(ratio, 3), "target": 1.15,
              "llada_8b_bf16_projection_gb": {k: round(v, 1) for k, v in projection.items()},
              "llada_8b_full_mdu_by_optimizer": breakdown}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"LLaDA-shaped model, {params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq} tokens, fp32, CPU")
    for mode in MODES:
        r = results[mode]
        print(f"  {mode:21s} peak RSS {r['peak_mb']:7.0f} MB   above start {r['training_mb']:7.0f} MB   "
              f"trainable {r['trainable'] / 1e6:6.2f}M")
    print(f"  LoRA MDU / LoRA fine-tuning (above start): {ratio:.3f} (target <= 1.15)")
    print("  projected GPU memory for LLaDA-8B in bf16 at 4 x 256 tokens:")
    for mode in MODES:
        print(f"    {mode:21s} ~{projection[mode]:.0f} GB")
    print("  full MDU on LLaDA-8B with gradient checkpointing, by optimizer and lever (bytes per parameter, GB):")
    print("  | mode | weights | anchor | gradients | optimizer | activations (GB) | total GB | fits |")
    print("  |---|---|---|---|---|---|---|---|")
    for row in breakdown:
        grads = f"{row['gradients']}" + (f" (+{row['gradient_transient_gb']:.1f} GB, one tensor)"
                                          if row["gradient_transient_gb"] else "")
        print(f"  | {row['mode']} | {row['weights']} | {row['anchor']} | {grads} | {row['optimizer']} | "
              f"{row['activations_gb']:.1f} | {row['total_gb']:.0f} | {row['fits']} |")


if __name__ == "__main__":
    main()
