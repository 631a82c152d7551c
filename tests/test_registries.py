"""The method and benchmark registries are the one place a method or a
benchmark is named: the command line, the config, the output name, the card
and the commit message all follow from an entry."""

from __future__ import annotations

import dataclasses

from click.testing import CliRunner

from mdu_cli.cli import cli
from mdu_cli.config.choices import UNLEARN_METHODS
from mdu_cli.config.training import FinetuneConfig, UnlearnConfig, build_config
from mdu_cli.evaluation.benchmarks import BENCHMARKS
from mdu_cli.methods import METHODS, method_of


def test_the_method_choices_are_the_registry():
    assert UNLEARN_METHODS == tuple(METHODS)
    method = next(f for f in dataclasses.fields(UnlearnConfig) if f.name == "method")
    assert method.metadata["choices"] == tuple(METHODS)
    help_text = CliRunner().invoke(cli, ["unlearn", "--help"], terminal_width=200).output
    assert "[" + "|".join(METHODS) + "]" in help_text


def test_each_method_reads_fields_of_the_unlearn_config_and_fine_tuning_does_not_know_them():
    unlearn = {f.name for f in dataclasses.fields(UnlearnConfig)}
    finetune = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for entry in METHODS.values():
        assert set(entry.options) <= unlearn - finetune, entry.name


def test_each_method_names_its_output_and_describes_itself(tmp_path):
    """The default output name, the loss built and the card's objective all
    come from the entry, for each method with its own knobs."""
    from mdu_cli.train.run import default_out_dir

    for name, knobs, suffix in (("mdu", {"tau": 2.0}, "-mdu-tau2"), ("ga", {}, "-ga"),
                                ("npo", {"npo_beta": 0.5}, "-npo-beta0.5")):
        cfg = build_config({}, dict(model="some/model-7B", forget="f.jsonl", method=name, **knobs))
        assert str(default_out_dir(cfg)) == "model-7B" + suffix
        assert cfg.described is METHODS[name] and type(cfg.objective()).__module__ == f"mdu_cli.methods.{name}"
        objective = METHODS[name].objective(cfg.to_dict())
        for value in knobs.values():
            assert str(value) in objective
    finetune = build_config({}, dict(model="some/model-7B", data="f.jsonl"), FinetuneConfig)
    assert str(default_out_dir(finetune)) == "model-7B-finetuned" and not finetune.described.unlearns
    assert method_of("finetune") is finetune.described


def test_every_benchmark_option_is_on_the_command_line_and_needs_its_benchmark(tmp_path):
    help_text = CliRunner().invoke(cli, ["eval", "--help"], terminal_width=200).output
    flags = [option.flag for entry in BENCHMARKS.values() for option in entry.options]
    assert len(flags) == len(set(flags)), "two benchmarks declare the same flag"
    for name, entry in BENCHMARKS.items():
        assert f"{entry.summary.split(':')[0]}" in help_text
        for option in entry.options:
            assert option.flag in help_text
            if option.default is None:
                value = option.choices[0] if option.choices else "x"
                result = CliRunner().invoke(cli, ["eval", str(tmp_path), option.flag, value])
                assert result.exit_code == 2 and f"{option.flag} needs --benchmark {name}" in result.output
