"""The shipped examples stay valid, and the demo really shows forgetting."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mdu_cli.cli import cli
from mdu_cli.config.training import build_config
from mdu_cli.config.yaml_file import read_yaml
from mdu_cli.data.records import load_dataset

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_example_files_parse_and_the_gpu_config_validates():
    assert len(load_dataset(EXAMPLES / "forget.jsonl")) == 6
    assert len(load_dataset(EXAMPLES / "retain.jsonl")) == 6
    cfg = build_config(read_yaml(EXAMPLES / "run.yaml"), {})
    assert cfg.model == "GSAI-ML/LLaDA-8B-Instruct" and cfg.tau == 2.0 and cfg.dtype == "bf16"
    demo = build_config(read_yaml(EXAMPLES / "demo" / "run.yaml"), {})
    assert Path(demo.model).is_dir() and demo.method == "mdu"


def _probabilities(report: dict, key: str) -> tuple[float, float]:
    splits = report[key]["splits"] if key == "base" else report["splits"]
    return splits["forget"]["probability"], splits["retain"]["probability"]


def test_mdu_forgets_the_demo_authors_and_keeps_the_others(tmp_path):
    """The documented promise (docs/unlearn.md), through the CLI: forget-set probability falls below
    half of the base's while the retain set keeps at least 80% of its own.
    Measured at seed 42 with this budget under the AVX-512, AVX2 and scalar kernels (the table
    in docs/unlearn.md): forget 0.16-0.19 of a 0.995 base, against the 0.50 asserted; retain
    0.90-0.91 of a 0.994 base, against the 0.80 asserted."""
    out = tmp_path / "demo-mdu"
    result = CliRunner().invoke(cli, ["unlearn", "--config", str(EXAMPLES / "demo" / "run.yaml"), "--out", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.stderr
    result = CliRunner().invoke(cli, [
        "eval", str(out), "--base", str(EXAMPLES / "demo" / "model"),
        "--forget", str(EXAMPLES / "demo" / "forget.jsonl"), "--retain", str(EXAMPLES / "demo" / "retain.jsonl"),
        "--mc-samples", "32", "--max-new-tokens", "0", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    base_forget, base_retain = _probabilities(report, "base")
    forget, retain = _probabilities(report, "model")
    assert base_forget > 0.9 and base_retain > 0.9, "the demo model knows its facts"
    assert forget < 0.5 * base_forget
    assert retain >= 0.8 * base_retain
    assert json.loads((out / "eval.json").read_text())["splits"]["forget"]["probability"] == forget


def test_the_tofu_example_separates_the_target_from_the_reference_and_unlearning_raises_it(tmp_path, capsys):
    """examples/tofu/run.py, the whole protocol offline (with MDU at tau = 1 only):
    the target model that learned the forget authors is told apart from the
    retain-only reference, unlearning moves it toward the reference, and both
    headline numbers recompute from the JSON reports.

    The thresholds sit where the CPU's kernels cannot move them. The forget
    set has 40 records, so the KS statistic moves in steps of 1/40 and the
    p-value finely. Measured under AVX-512, AVX2 and the scalar kernels (the
    figures in examples/tofu/README.md): the target is 25 to 27 of 40 steps
    from the reference (p <= 1.2e-7), and p < 1e-4 needs 20; MDU's
    distance is 12 to 14 steps, and the 100-fold rise asserted needs it below
    about 22. Forget probability: target 0.88-0.91 against > 0.8, reference
    0.07-0.08 against < 0.2, MDU 0.03-0.13 against half the target's."""
    import importlib.util
    import math

    from scipy.stats import hmean, ks_2samp

    spec = importlib.util.spec_from_file_location("tofu_example", EXAMPLES / "tofu" / "run.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = EXAMPLES / "tofu" / "data"
    inputs = {p: p.read_bytes() for p in [*data.iterdir(), *(EXAMPLES / "demo" / "model").iterdir()]}
    rows = dict(example.main(tmp_path, methods=1))
    assert {p: p.read_bytes() for p in inputs} == inputs, "the example's inputs are untouched"
    reference, target, mdu = rows["reference (retain only)"], rows["target, before unlearning"], rows["MDU, tau = 1"]
    assert reference["forget_quality"] is None
    assert target["forget_quality"] < 1e-4, "a model that learned the forget set is told apart from the reference"
    assert mdu["forget_quality"] > 100 * target["forget_quality"], "unlearning raises forget quality"
    forget_probability = {name: report["splits"]["forget"]["probability"] for name, report in rows.items()}
    assert forget_probability["target, before unlearning"] > 0.8, "the target learned the forget authors"
    assert forget_probability["reference (retain only)"] < 0.2, "the reference never saw them"
    assert forget_probability["MDU, tau = 1"] < 0.5 * forget_probability["target, before unlearning"]
    for report in (target, mdu):
        ratios = report["splits"]["forget"]["truth_ratio_per_record"]
        assert len(ratios) == 40
        # null is an infinite ratio (the answer's probability underflowed), above every finite one
        as_numbers = [[math.inf if r is None else r for r in values]
                      for values in (ratios, reference["splits"]["forget"]["truth_ratio_per_record"])]
        assert report["forget_quality"] == ks_2samp(*as_numbers).pvalue
        components = list(report["model_utility_components"].values())
        assert len(components) == 9 and report["model_utility"] == float(hmean(components))
        assert not math.isnan(report["model_utility"])
    table = capsys.readouterr().out
    assert "| MDU, tau = 1 |" in table and "| model | forget quality | model utility |" in table


def test_the_rwku_example_forgets_the_target_from_a_corpus_the_model_wrote(tmp_path, capsys):
    """examples/rwku/run.py, the whole protocol offline (at one tau): the model
    writes its corpus, MDU unlearns it forget-only, and RWKU's forget probes
    fall well below the original's; the aggregated table is the reports' own
    numbers.

    Margins (examples/rwku/README.md, measured under AVX-512, AVX2 and the
    scalar kernels): the original scores 0.444 on the forget probes (its
    numbers involve no training, so every CPU gives them); MDU at tau 1
    0.156, against the asserted < 0.75 x 0.444 = 0.333."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rwku_example", EXAMPLES / "rwku" / "run.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    inputs = {p: p.read_bytes() for p in [*(EXAMPLES / "rwku" / "data" / "All").iterdir(),
                                          *(EXAMPLES / "demo" / "model").iterdir()]}
    [report] = example.main(tmp_path, taus=("1",))
    assert {p: p.read_bytes() for p in inputs} == inputs, "the example's inputs are untouched"
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert len(corpus) == 32 and all(r["prompt"].endswith("biography of elspeth moraine.") for r in corpus)
    base, model = report["base"]["table"], report["table"]
    assert base["forget All"] == pytest.approx(4 / 9), "the original knows the target"
    assert model["forget All"] < 0.75 * base["forget All"], "unlearning its own corpus makes it forget"
    assert report["change"]["forget All"] == pytest.approx(model["forget All"] - base["forget All"])
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert f"| {base['forget All']:.3f} |" in rows["original"] and f"| {model['forget All']:.3f} |" in rows["mdu"]
