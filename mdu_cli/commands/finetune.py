"""`mdu finetune`: plain MDLM fine-tuning by the loop, layout and machinery of
`mdu unlearn` (resume, LoRA, several processes), e.g. to build TOFU's target
model (the base trained on every author) and its retain-only reference."""

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
from mdu_cli.config.training import FinetuneConfig

EXAMPLES = """
\b
Examples:
  # TOFU's target model: LLaDA on every fictitious author
  mdu finetune --model GSAI-ML/LLaDA-8B-Instruct --data hf://datasets/locuslab/TOFU/full.json \\
      --out llada-tofu-full --epochs 5 --lr 1e-5
\b
  # ...and the reference that never saw the forget authors
  mdu finetune --model GSAI-ML/LLaDA-8B-Instruct --data hf://datasets/locuslab/TOFU/retain90.json \\
      --out llada-tofu-retain90 --epochs 5 --lr 1e-5
"""


@click.command("finetune", epilog=EXAMPLES)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file of options (data: instead of forget:); flags override it.")
@config_options(FinetuneConfig, ("model", "data", *LOADING, *OPTIMISATION))
@json_option
@click.pass_context
def finetune(ctx: click.Context, config_file, as_json, **flags) -> None:
    """Fine-tune a masked diffusion LM on question-answer records.

    The MDLM loss: mask each answer token with probability t ~ U[0.001, 1),
    score the clean tokens at the masked positions weighted by 1/t (CART for
    Dream), over the answer tokens of the batch. The output has
    the layout of `mdu unlearn`: weights loadable like the base, mdu_run.json,
    train_log.jsonl, the delta report and a card.
    """
    cfg = config_from(ctx, config_file, flags, "finetune")

    from mdu_cli.train.run import run_unlearn

    print_summary(run_unlearn(cfg, show_progress=not as_json), as_json)

