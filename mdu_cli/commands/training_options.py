"""The options `mdu unlearn` and `mdu finetune` share, and the step from
parsed options to one `UnlearnConfig` (defaults < YAML file < typed flags)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from mdu_cli.config.choices import DEVICES, DTYPES, FAMILIES, OPTIMIZERS
from mdu_cli.config.training import UnlearnConfig, build_config, read_yaml

D = UnlearnConfig()


def _loading_options() -> list:
    return [
        click.option("--out", help="Output directory.  [default: <model name>-mdu-tau<tau>, or -finetuned]"),
        click.option("--overwrite", is_flag=True,
                     help="Replace --out when it holds a previous mdu output (its run record and nothing mdu did "
                          "not write); any other non-empty folder is refused."),
        click.option("--family", type=click.Choice(FAMILIES), help="Override the detected family."),
        click.option("--revision", help="Hub branch, tag or commit to pin; the resolved commit is recorded."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Run the Python code of a Hub repo outside GSAI-ML/, Dream-org/, inclusionAI/."),
        click.option("--chat-template", type=click.Path(dir_okay=False),
                     help="Jinja chat template replacing the tokenizer's."),
        click.option("--max-length", type=int, default=D.max_length, show_default=True,
                     help="Tokens per record; longer responses are cut."),
    ]


def _optimisation_options() -> list:
    return [
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=D.optimizer, show_default=True,
                     help="auto: torch's AdamW for fp32 weights, Kahan-compensated AdamW (torch-optimi) for bf16 "
                     "ones, whose plain updates round away. adamw-sr (stochastic rounding) and adamw-8bit "
                     "(8-bit states) need mdu-cli[torchao]."),
        click.option("--lr", type=float, default=D.lr, show_default=True, help="AdamW learning rate."),
        click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True,
                     help="AdamW weight decay."),
        click.option("--warmup-ratio", type=float, default=D.warmup_ratio, show_default=True,
                     help="Linear warmup share, then cosine decay."),
        click.option("--epochs", type=int, default=D.epochs, show_default=True, help="Passes over the data."),
        click.option("--max-steps", type=int, help="Optimizer steps; replaces --epochs."),
        click.option("--batch-size", type=int, default=D.batch_size, show_default=True,
                     help="Records per micro-batch (forget and retain alike)."),
        click.option("--grad-accum", type=int, default=D.grad_accum, show_default=True,
                     help="Micro-batches per optimizer step."),
        click.option("--max-grad-norm", type=float, default=D.max_grad_norm, show_default=True,
                     help="Clip the gradient to this global norm; 0: no clipping."),
        click.option("--optimizer-in-backward", is_flag=True,
                     help="Step each parameter inside backward and free its gradient at once: no full set of "
                     "gradients in memory (2 bytes a parameter on bf16). Needs --grad-accum 1 and "
                     "--max-grad-norm 0, one process."),
        click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed for data order and masks."),
        click.option("--device", type=click.Choice(DEVICES), default=D.device, show_default=True),
        click.option("--dtype", type=click.Choice(DTYPES), default=D.dtype, show_default=True,
                     help="auto: bf16 weights on CUDA, fp32 on CPU. fp16: fp32 weights with fp16 autocast (CUDA)."),
        click.option("--gradient-checkpointing", is_flag=True,
                     help="Recompute block activations in backward: less memory, about a third more time."),
        click.option("--lora", is_flag=True, help="Train a LoRA adapter (for unlearning, the anchor is the model "
                     "with the adapter off)."),
        click.option("--lora-r", type=int, default=D.lora_r, show_default=True, help="LoRA rank."),
        click.option("--lora-alpha", type=float, default=D.lora_alpha, show_default=True,
                     help="LoRA alpha (scale alpha/r)."),
        click.option("--lora-dropout", type=float, default=D.lora_dropout, show_default=True),
        click.option("--lora-targets", help="Comma-separated linear layer names inside the blocks.  "
                     "[default: all of them; never the head]"),
        click.option("--save-adapter", is_flag=True,
                     help="With --lora: write the adapter alone (PEFT layout), not merged weights."),
        click.option("--report-to", help="Experiment trackers, comma-separated: tensorboard, wandb, trackio "
                     "(install the extra of the same name). They get the numbers of train_log.jsonl."),
        click.option("--logging-dir", help="Where trackers write.  [default: <out>-logs]"),
        click.option("--eval-every", type=int, help="Every N steps (and before the first), log the answer "
                     "probability of the first --eval-records forget and retain records."),
        click.option("--eval-records", type=int, default=D.eval_records, show_default=True,
                     help="Records per split that --eval-every probes."),
        click.option("--save-every", type=int, help="Save resumable state beside the output every N steps."),
        click.option("--resume", is_flag=True, help="Continue from the saved state of the same command."),
        click.option("--max-shard-size", default=D.max_shard_size, show_default=True,
                     help="Largest safetensors shard."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout; no progress bar."),
    ]


def apply(function, options: list):
    for option in reversed(options):
        function = option(function)
    return function


def loading_options(function):
    return apply(function, _loading_options())


def optimisation_options(function):
    return apply(function, _optimisation_options())


def config_from(ctx: click.Context, config_file, flags: dict, command: str, renames: dict | None = None,
                fixed: dict | None = None) -> UnlearnConfig:
    """Defaults < the YAML file < the flags the user typed (a flag left at its
    default does not override the file)."""
    file_options = read_yaml(config_file, command) if config_file else {}
    typed = {
        (renames or {}).get(name, name): value for name, value in flags.items()
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    if config_file:
        typed["config_file"] = str(config_file)
    return build_config(file_options, {**typed, **(fixed or {})})


def print_summary(result, as_json: bool) -> None:
    import json

    if result.record is None:
        return  # a non-main process of a multi-process run: the main one reports
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    forget = summary["forget_loss"]
    name = "training loss" if result.record["command"] == "finetune" else "forget loss"
    click.echo(f"Wrote {summary['out_dir']} after {summary['steps']} steps "
               f"({name} {forget['first']:.4f} -> {forget['last']:.4f}"
               + (f", retain loss {summary['retain_loss']['first']:.4f} -> {summary['retain_loss']['last']:.4f}"
                  if summary["retain_loss"]["first"] is not None else "")
               + f", {summary['wall_time_s']:.1f}s; {summary['tensors_changed']} of {summary['tensors_compared']} "
               "tensors changed)")
    if summary["top_layers"]:
        click.echo("Layers that moved most (relative L2): " + ", ".join(
            f"{entry['layer']} ({entry['rel_l2']:.2e})" for entry in summary["top_layers"]))
