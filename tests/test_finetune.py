"""`mdu finetune`: plain MDLM fine-tuning by the unlearn machinery (its loss is
checked against a float64 reference in test_training_step.py)."""

import json

import pytest
from click.testing import CliRunner
from conftest import FORGET_RECORDS, write_jsonl
from test_hostile_inputs import snapshot

from mdu_cli.cli import cli


def _run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.numerics
def test_finetune_learns_its_data_and_writes_the_unlearn_layout(masked_lm_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", FORGET_RECORDS)
    out = tmp_path / "tuned"
    before = snapshot(data, masked_lm_dir)
    result = _run("finetune", "--model", str(masked_lm_dir), "--data", str(data), "--out", str(out),
                  "--max-steps", "30", "--lr", "3e-3", "--batch-size", "4", "--grad-accum", "1", "--warmup-ratio", "0",
                  "--json")
    assert result.exit_code == 0, result.stderr
    assert snapshot(data, masked_lm_dir) == before, "the inputs are never modified"
    record = json.loads((out / "mdu_run.json").read_text())
    assert record["command"] == "finetune" and record["method"] == "finetune"
    assert record["data"]["forget"]["records"] == len(FORGET_RECORDS) and record["data"]["retain"] is None
    losses = [json.loads(line)["forget_loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    # Measured 0.690 under the AVX-512, AVX2 and scalar kernels alike (they agree to 1e-7).
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:5]) / 5, "the training loss falls on the data it sees"
    card = (out / "README.md").read_text()
    assert "MDLM fine-tuning" in card and "machine-unlearning" not in card and "training loss" in card
    assert {"model.safetensors", "config.json", "delta_report.json"} <= {p.name for p in out.iterdir()}

    # The answers it trained on became likelier than under the base.
    result = _run("eval", str(out), "--base", str(masked_lm_dir), "--forget", str(data), "--mc-samples", "16",
                  "--max-new-tokens", "0", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    # 7.7 times the base's under every kernel level.
    assert report["splits"]["forget"]["probability"] > 2 * report["base"]["splits"]["forget"]["probability"]


def test_finetune_reads_data_from_a_yaml_file(masked_lm_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", FORGET_RECORDS)
    config = tmp_path / "ft.yaml"
    config.write_text(f"model: {masked_lm_dir}\ndata: train.jsonl\nmax_steps: 1\nout: out\n")
    result = _run("finetune", "--config", str(config), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "out" / "mdu_run.json").read_text())["config"]["data"] == str(
        tmp_path / "train.jsonl")


@pytest.mark.parametrize("text, message", [
    ("tau: 1.0\n", "unknown option 'tau'; the options are those of `mdu finetune --help`"),
    ("forget: x.jsonl\n", "unknown option 'forget'"),
])
def test_unlearn_options_in_a_finetune_file_are_refused(masked_lm_dir, tmp_path, text, message):
    config = tmp_path / "ft.yaml"
    config.write_text(f"model: {masked_lm_dir}\ndata: train.jsonl\n" + text)
    before = snapshot(config)
    result = _run("finetune", "--config", str(config))
    assert result.exit_code == 2 and message in result.stderr
    assert snapshot(config) == before


def test_finetune_needs_data_and_unlearn_refuses_the_finetune_method(masked_lm_dir, tmp_path):
    result = _run("finetune", "--model", str(masked_lm_dir))
    assert result.exit_code == 2 and "--data is required" in result.stderr
    config = tmp_path / "u.yaml"
    config.write_text(f"model: {masked_lm_dir}\nforget: f.jsonl\nmethod: finetune\n")
    result = _run("unlearn", "--config", str(config))
    assert result.exit_code == 2 and "plain fine-tuning is `mdu finetune`" in result.stderr
    assert not list(tmp_path.glob("*finetuned*")) and not list(tmp_path.glob("*-mdu-*"))


def test_finetune_on_hub_data_records_the_commit(hub, masked_lm_dir, tmp_path):
    body = "".join(json.dumps(r) + "\n" for r in FORGET_RECORDS).encode()
    hub.datasets[("locuslab/TOFU", "main")] = ("c" * 40, {"full.json": body})
    out = tmp_path / "tuned"
    result = _run("finetune", "--model", str(masked_lm_dir), "--data", "hf://datasets/locuslab/TOFU/full.json",
                  "--out", str(out), "--max-steps", "1", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads((out / "mdu_run.json").read_text())["data"]["forget"]
    assert data["path"] == "hf://datasets/locuslab/TOFU/full.json"
    assert data["hub"]["commit"] == "c" * 40 and data["records"] == len(FORGET_RECORDS)
    assert "locuslab/TOFU/full.json` @ `" + "c" * 40 in (out / "README.md").read_text()
    assert not any(p.suffix == ".json" and p.name == "full.json" for p in out.rglob("*")), "no copy of the data"
