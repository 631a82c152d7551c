"""`mdu unlearn`: parse options, build the config, call `run_unlearn`, print."""

from __future__ import annotations

import json

import click
from click.core import ParameterSource

from mdu_cli.config import (DEVICES, DTYPES, FAMILIES, KL_DIRECTIONS, METHODS, UnlearnConfig, build_config,
                            read_yaml)

D = UnlearnConfig()

EXAMPLES = """
\b
Examples:
  # LLaDA-8B-Instruct on a GPU, forget only
  mdu unlearn --model GSAI-ML/LLaDA-8B-Instruct --forget data.jsonl --tau 2.0
\b
  # Dream with a retain set to keep utility, pinned revision
  mdu unlearn --model Dream-org/Dream-v0-Instruct-7B --revision main \\
      --forget forget.jsonl --retain retain.jsonl --out dream-forgot
\b
  # Everything from a file, one flag overridden
  mdu unlearn --config examples/run.yaml --max-steps 20

  # LoRA on a 40 GB card, resumable, adapter only
  mdu unlearn --model GSAI-ML/LLaDA-8B-Instruct --forget data.jsonl --lora --save-adapter \
      --gradient-checkpointing --save-every 50

  # Two GPUs with DDP
  accelerate launch --multi_gpu --num_processes 2 -m mdu_cli unlearn --model GSAI-ML/LLaDA-8B-Instruct \
      --forget data.jsonl
"""


@click.command(epilog=EXAMPLES)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of options; flags override it.")
@click.option("--model", help="Base checkpoint: a local directory or a Hub model id.")
@click.option("--forget", help="Records to unlearn: JSONL or a JSON array.  [required]")
@click.option("--retain", help="Records whose behaviour to keep (optional).")
@click.option("--out", help="Output directory.  [default: <model name>-mdu-tau<tau>]")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--family", type=click.Choice(FAMILIES), help="Override the detected family.")
@click.option("--revision", help="Hub branch, tag or commit to pin; the resolved commit is recorded.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the Python code of a Hub repo outside GSAI-ML/, Dream-org/, inclusionAI/.")
@click.option("--chat-template", type=click.Path(dir_okay=False), help="Jinja chat template replacing the tokenizer's.")
@click.option("--max-length", type=int, default=D.max_length, show_default=True, help="Tokens per record; longer responses are cut.")
@click.option("--method", type=click.Choice(METHODS), default=D.method, show_default=True,
              help="mdu, or a baseline: ga (gradient ascent), npo (negative preference optimisation).")
@click.option("--npo-beta", type=float, default=D.npo_beta, show_default=True, help="Beta of the npo baseline.")
@click.option("--tau", type=float, default=D.tau, show_default=True, help="Anchor temperature (>= 0; 0 = uniform target).")
@click.option("--eta", type=float, default=D.eta, show_default=True, help="Extrapolation of the target away from the conditional.")
@click.option("--kl", type=click.Choice(KL_DIRECTIONS), default=D.kl, show_default=True, help="Divergence direction.")
@click.option("--alpha", type=float, help="Retain-loss weight.  [default: 1.0 with --retain, else 0]")
@click.option("--lr", type=float, default=D.lr, show_default=True, help="AdamW learning rate.")
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True, help="AdamW weight decay.")
@click.option("--warmup-ratio", type=float, default=D.warmup_ratio, show_default=True, help="Linear warmup share, then cosine decay.")
@click.option("--epochs", type=int, default=D.epochs, show_default=True, help="Passes over the forget set.")
@click.option("--max-steps", type=int, help="Optimizer steps; replaces --epochs.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Forget (and retain) records per micro-batch.")
@click.option("--grad-accum", type=int, default=D.grad_accum, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-grad-norm", type=float, default=D.max_grad_norm, show_default=True, help="Gradient clipping norm.")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed for data order and masks.")
@click.option("--device", type=click.Choice(DEVICES), default=D.device, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default=D.dtype, show_default=True,
              help="auto: bf16 weights on CUDA, fp32 on CPU. fp16: fp32 weights with fp16 autocast (CUDA).")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute block activations in backward: less memory, about a third more time.")
@click.option("--lora", is_flag=True, help="Train a LoRA adapter; the anchor is the model with the adapter off.")
@click.option("--lora-r", type=int, default=D.lora_r, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=float, default=D.lora_alpha, show_default=True, help="LoRA alpha (scale alpha/r).")
@click.option("--lora-dropout", type=float, default=D.lora_dropout, show_default=True)
@click.option("--lora-targets", help="Comma-separated linear layer names inside the blocks.  "
              "[default: all of them; never the head]")
@click.option("--save-adapter", is_flag=True, help="With --lora: write the adapter alone (PEFT layout), not merged weights.")
@click.option("--save-every", type=int, help="Save resumable state beside the output every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the saved state of the same command.")
@click.option("--max-shard-size", default=D.max_shard_size, show_default=True, help="Largest safetensors shard.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout; no progress bar.")
@click.pass_context
def unlearn(ctx: click.Context, config_file, as_json, **flags) -> None:
    """Run Masked Diffusion Unlearning on a checkpoint.

    Pulls the model's prompt-conditional prediction toward the frozen starting
    model's prompt-masked prediction (scaled by --tau) at every masked response
    position of the forget records, with an optional MDLM retain loss. Writes
    safetensors weights loadable like the base, mdu_run.json, train_log.jsonl and
    the parameter-delta report (delta_report.json, delta_report.md).
    """
    file_options = read_yaml(config_file) if config_file else {}
    typed = {
        name: value for name, value in flags.items()
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    if config_file:
        typed["config_file"] = str(config_file)
    cfg = build_config(file_options, typed)

    from mdu_cli.unlearn import run_unlearn

    result = run_unlearn(cfg, show_progress=not as_json)
    if result.record is None:
        return  # a non-main process of a multi-process run: the main one reports
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    forget = summary["forget_loss"]
    click.echo(f"Wrote {summary['out_dir']} after {summary['steps']} steps "
               f"(forget loss {forget['first']:.4f} -> {forget['last']:.4f}"
               + (f", retain loss {summary['retain_loss']['first']:.4f} -> {summary['retain_loss']['last']:.4f}"
                  if summary["retain_loss"]["first"] is not None else "")
               + f", {summary['wall_time_s']:.1f}s; {summary['tensors_changed']} of {summary['tensors_compared']} "
               "tensors changed)")
    if summary["top_layers"]:
        click.echo("Layers that moved most (relative L2): " + ", ".join(
            f"{entry['layer']} ({entry['rel_l2']:.2e})" for entry in summary["top_layers"]))
