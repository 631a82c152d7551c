"""Watching a run: --eval-every's probe and --report-to's trackers."""

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file
from test_hostile_inputs import snapshot

from mdu_cli.cli import cli

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


def _unlearn(llada_dir, forget_file, retain_file, out, *extra):
    return CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--retain",
                                    str(retain_file), "--out", str(out), "--max-steps", "5", "--batch-size", "2",
                                    "--grad-accum", "1", "--lr", "1e-3", "--device", "cpu", "--json", *extra])


def _eval_probability(model, data, split_records, seed):
    from mdu_cli.evaluation.report import run_eval

    report = run_eval(str(model), str(data), mc_samples=32, limit=split_records, seed=seed,
                      generation={"max_new_tokens": 0}, device="cpu", show_progress=False, write=False)
    return report["splits"]["forget"]["probability"]


def test_probe_curve_and_tensorboard_hold_the_log(llada_dir, forget_file, retain_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs = tmp_path / "out", tmp_path / "tb"
    before = snapshot(forget_file, retain_file, llada_dir)
    result = _unlearn(llada_dir, forget_file, retain_file, out, "--eval-every", "2", "--eval-records", "3",
                      "--report-to", "tensorboard", "--logging-dir", str(logs))
    assert result.exit_code == 0, result.stderr
    assert snapshot(forget_file, retain_file, llada_dir) == before
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2, 3, 4, 5]
    probed = {e["step"]: e["eval"] for e in log if "eval" in e}
    assert sorted(probed) == [0, 2, 4, 5], "before the first step, every second step, and the last"
    assert set(probed[0]) == {"forget_probability", "retain_probability"}
    # The probe measures the model it is given: the base before training, the
    # output after the last step, as `mdu eval` would (same records, samples, seed).
    assert probed[0]["forget_probability"] == pytest.approx(_eval_probability(llada_dir, forget_file, 3, 42),
                                                            rel=1e-4)
    assert probed[5]["forget_probability"] == pytest.approx(_eval_probability(out, forget_file, 3, 42), rel=1e-4)
    assert probed[5]["forget_probability"] != probed[0]["forget_probability"], "measured on the trained weights"

    # Tensorboard holds every number of the log at its step.
    assert (logs / "mdu-unlearn").is_dir(), "one folder per command under --logging-dir"
    events = EventAccumulator(str(logs / "mdu-unlearn")).Reload()
    losses = {e.step: e.value for e in events.Scalars("forget_loss")}
    assert losses == pytest.approx({e["step"]: e["forget_loss"] for e in log if "forget_loss" in e}, rel=1e-6)
    curve = {e.step: e.value for e in events.Scalars("eval/forget_probability")}
    assert curve == pytest.approx({s: v["forget_probability"] for s, v in probed.items()}, rel=1e-6)
    assert {"lr", "grad_norm", "retain_loss", "eval/retain_probability"} <= set(events.Tags()["scalars"])
    assert not any(p.name.startswith("events") for p in out.rglob("*")), "tracker files stay out of the output"


def test_the_probe_changes_no_weight(llada_dir, forget_file, retain_file, tmp_path):
    assert _unlearn(llada_dir, forget_file, retain_file, tmp_path / "a").exit_code == 0
    assert _unlearn(llada_dir, forget_file, retain_file, tmp_path / "b", "--eval-every", "1").exit_code == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(a[name].equal(b[name]) for name in a)


@pytest.mark.parametrize("extra, message", [
    (["--report-to", "tensorbored"], "--report-to 'tensorbored' is not a tracker mdu supports"),
    (["--report-to", "wandb"], "--report-to wandb needs the wandb package; pip install 'mdu-cli[wandb]'"),
    (["--eval-every", "0"], "--eval-every must be a whole number >= 1"),
])
def test_bad_monitoring_options_are_usage_errors(llada_dir, forget_file, retain_file, tmp_path, extra, message,
                                                 monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    before = snapshot(forget_file, retain_file)
    result = _unlearn(llada_dir, forget_file, retain_file, tmp_path / "out", *extra)
    assert result.exit_code == 2 and message in result.stderr
    assert snapshot(forget_file, retain_file) == before and not (tmp_path / "out").exists()


def test_logging_dir_inside_the_output_is_refused(llada_dir, forget_file, retain_file, tmp_path):
    result = _unlearn(llada_dir, forget_file, retain_file, tmp_path / "out", "--report-to", "tensorboard",
                      "--logging-dir", str(tmp_path / "out" / "tb"))
    assert result.exit_code == 2 and "lies inside --out" in result.stderr


def test_trackers_receive_no_local_path_or_file_name():
    """wandb and trackio send the options to a server: the forget file's
    name (which may be the person being forgotten) and every other local path
    go as "(local)"; Hub ids, hf:// names and the options themselves stay."""
    from mdu_cli.config.training import build_config
    from mdu_cli.train.monitor import tracker_config

    cfg = build_config({}, dict(model="GSAI-ML/LLaDA-8B-Instruct", forget="/home/me/cases/forget-john-doe.jsonl",
                                retain="hf://datasets/locuslab/TOFU/retain90.json", out="/home/me/out",
                                chat_template="/home/me/t.jinja", logging_dir="/home/me/logs", tau=2.0))
    sent = tracker_config(cfg.to_dict(), {"GSAI-ML/LLaDA-8B-Instruct"})
    assert "john-doe" not in json.dumps(sent) and "/home/me" not in json.dumps(sent)
    assert sent["forget"] == sent["out"] == sent["chat_template"] == sent["logging_dir"] == "(local)"
    assert sent["model"] == "GSAI-ML/LLaDA-8B-Instruct" and sent["retain"] == "hf://datasets/locuslab/TOFU/retain90.json"
    assert sent["tau"] == 2.0
    local = tracker_config(build_config({}, dict(model="/home/me/base", forget="f.jsonl")).to_dict())
    assert local["model"] == "(local)"
