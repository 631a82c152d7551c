"""`mdu unlearn`: parse options, build the config, call `run_unlearn`, print."""

from __future__ import annotations

import click

from mdu_cli.commands.training_options import (
    LOADING,
    OPTIMISATION,
    config_from,
    config_options,
    json_option,
    print_summary,
)
from mdu_cli.config.training import UnlearnConfig

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
  # TOFU forget10 straight from the Hub
  mdu unlearn --model ./llada-tofu-full --forget hf://datasets/locuslab/TOFU/forget10.json \\
      --retain hf://datasets/locuslab/TOFU/retain90.json --tau 1.0
\b
  # Everything from a file, one flag overridden
  mdu unlearn --config examples/run.yaml --max-steps 20
\b
  # LoRA on a 40 GB card, resumable, adapter only
  mdu unlearn --model GSAI-ML/LLaDA-8B-Instruct --forget data.jsonl --lora --save-adapter \\
      --gradient-checkpointing --save-every 50
\b
  # Full MDU of LLaDA-8B on one 80 GB GPU (70 GB measured at 4 x 256 tokens)
  mdu unlearn --model GSAI-ML/LLaDA-8B-Instruct --forget data.jsonl --retain retain.jsonl \\
      --gradient-checkpointing --anchor-offload --optimizer-in-backward \\
      --batch-size 4 --grad-accum 1 --max-grad-norm 0
\b
  # Two GPUs with DDP
  accelerate launch --multi_gpu --num_processes 2 -m mdu_cli unlearn \\
      --model GSAI-ML/LLaDA-8B-Instruct --forget data.jsonl
"""


@click.command(epilog=EXAMPLES)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file of options; flags override it.")
@config_options(UnlearnConfig, ("model", "forget", "retain", *LOADING, "method", "npo_beta", "tau", "eta", "kl",
                                "alpha", "batch_accounting", "anchor_offload", *OPTIMISATION))
@json_option
@click.pass_context
def unlearn(ctx: click.Context, config_file, as_json, **flags) -> None:
    """Run Masked Diffusion Unlearning on a checkpoint.

    Pulls the model's prompt-conditional prediction toward the frozen starting
    model's prompt-masked prediction (scaled by --tau) at every masked response
    position of the forget records, with an optional MDLM retain loss. Writes
    safetensors weights loadable like the base, mdu_run.json, train_log.jsonl and
    the parameter-delta report (delta_report.json, delta_report.md).
    """
    cfg = config_from(ctx, config_file, flags, "unlearn")

    from mdu_cli.train.run import run_unlearn

    print_summary(run_unlearn(cfg, show_progress=not as_json), as_json)
