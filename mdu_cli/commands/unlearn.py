"""`mdu unlearn`: parse options, build the config, call `run_unlearn`, print."""

from __future__ import annotations

import click

from mdu_cli.commands.training_options import D, config_from, loading_options, optimisation_options, print_summary
from mdu_cli.config.choices import BATCH_ACCOUNTINGS, KL_DIRECTIONS, UNLEARN_METHODS
from mdu_cli.errors import ConfigError
from mdu_cli.methods import METHODS

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
@click.option("--model", help="Base checkpoint: a local directory or a Hub model id.")
@click.option("--forget", help="Records to unlearn: JSONL or a JSON array, or hf://datasets/OWNER/NAME/PATH.  "
              "[required]")
@click.option("--retain", help="Records whose behaviour to keep (optional; a file or hf://datasets/...).")
@loading_options
@click.option("--method", type=click.Choice(UNLEARN_METHODS), default=D.method, show_default=True,
              help="mdu, or a baseline: " + ", ".join(m.summary for m in METHODS.values() if m.name != "mdu") + ".")
@click.option("--npo-beta", type=float, default=D.npo_beta, show_default=True,
              help="Beta of the npo baseline (on per-token scores).")
@click.option("--tau", type=float, default=D.tau, show_default=True,
              help="Anchor temperature (>= 0; 0 = uniform target).")
@click.option("--eta", type=float, default=D.eta, show_default=True,
              help="Extrapolation of the target away from the conditional.")
@click.option("--kl", type=click.Choice(KL_DIRECTIONS), default=D.kl, show_default=True, help="Divergence direction.")
@click.option("--alpha", type=float, help="Retain-loss weight.  [default: 1.0 with --retain, else 0]")
@click.option("--batch-accounting", type=click.Choice(BATCH_ACCOUNTINGS), default=D.batch_accounting,
              show_default=True, help="separate: each micro-batch has --batch-size forget rows plus as many retain "
              "rows, an epoch is a pass over the forget set. joint: the reference code's way, forget and retain "
              "shuffled into one set, an epoch a pass over both (twice the steps for equal sizes).")
@click.option("--anchor-offload", is_flag=True,
              help="Full MDU/NPO: keep the frozen anchor in host memory and move each block to the GPU for its "
              "forward only (the weights' size less GPU memory, slower steps).")
@optimisation_options
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
    if cfg.method not in UNLEARN_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(UNLEARN_METHODS)} (got {cfg.method!r}); "
                          "plain fine-tuning is `mdu finetune`")

    from mdu_cli.train.run import run_unlearn

    print_summary(run_unlearn(cfg, show_progress=not as_json), as_json)
