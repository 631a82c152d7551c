"""The options `mdu unlearn` and `mdu finetune` share, built from the config
fields' own declarations (help, choices, defaults: `config/training.py`), and
the step from parsed options to a config (defaults < YAML file < typed flags)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from mdu_cli.config.fields import declared, default_of
from mdu_cli.config.training import CONFIGS, TrainingConfig, build_config, kind_of
from mdu_cli.config.yaml_file import read_yaml
from mdu_cli.methods import method_of

# The order the shared options appear in --help.
LOADING = ("out", "overwrite", "family", "revision", "trust_remote_code", "chat_template", "max_length")
OPTIMISATION = ("optimizer", "lr", "weight_decay", "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum",
                "max_grad_norm", "optimizer_in_backward", "stack_forward", "compile_blocks", "seed", "device", "dtype",
                "gradient_checkpointing", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                "save_adapter", "report_to", "logging_dir", "eval_every", "eval_records", "save_every", "resume",
                "max_shard_size")


def click_option(cls: type[TrainingConfig], name: str):
    """The Click option of one config field, from its declaration."""
    item = declared(cls, name)
    meta, kind, default = item.metadata, kind_of(cls, name), default_of(item)
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        return click.option(flag, is_flag=True, help=meta["help"])
    if meta["choices"]:
        kind = click.Choice(meta["choices"])
    elif meta["file"]:
        kind = click.Path(dir_okay=False)
    elif kind is str:
        kind = None
    options = {"type": kind, "help": meta["help"]}
    if default is not None:
        options.update(default=default, show_default=True if meta["show_default"] is None else meta["show_default"])
    return click.option(flag, **options)


def config_options(cls: type[TrainingConfig], names):
    """A decorator adding the options of `names` (config fields of `cls`), in order."""
    def decorate(function):
        for name in reversed(names):
            function = click_option(cls, name)(function)
        return function

    return decorate


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout; no progress bar.")


def config_from(ctx: click.Context, config_file, flags: dict, command: str) -> TrainingConfig:
    """Defaults < the YAML file < the flags the user typed (a flag left at its
    default does not override the file)."""
    file_options = read_yaml(config_file, command) if config_file else {}
    typed = {name: value for name, value in flags.items()
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    if config_file:
        typed["config_file"] = str(config_file)
    return build_config(file_options, typed, CONFIGS[command])


def print_summary(result, as_json: bool) -> None:
    import json

    if result.record is None:
        return  # a non-main process of a multi-process run: the main one reports
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    forget = summary["forget_loss"]
    name = "forget loss" if method_of(result.record["method"]).unlearns else "training loss"
    click.echo(f"Wrote {summary['out_dir']} after {summary['steps']} steps "
               f"({name} {forget['first']:.4f} -> {forget['last']:.4f}"
               + (f", retain loss {summary['retain_loss']['first']:.4f} -> {summary['retain_loss']['last']:.4f}"
                  if summary["retain_loss"]["first"] is not None else "")
               + f", {summary['wall_time_s']:.1f}s; {summary['tensors_changed']} of {summary['tensors_compared']} "
               "tensors changed)")
    if summary["top_layers"]:
        click.echo("Layers that moved most (relative L2): " + ", ".join(
            f"{entry['layer']} ({entry['rel_l2']:.2e})" for entry in summary["top_layers"]))
