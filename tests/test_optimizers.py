"""--optimizer: the choice for the weights' precision, the record, and resume
of every optimizer buffer (Kahan compensation included)."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mdu_cli import optimizers
from mdu_cli.cli import cli
from mdu_cli.errors import ConfigError
from test_hostile_inputs import snapshot


def test_auto_takes_adamw_for_fp32_and_the_kahan_adamw_for_bf16():
    assert optimizers.resolve("auto", torch.float32) == "adamw"
    assert optimizers.resolve("auto", torch.bfloat16) == "adamw-kahan" == optimizers.DEFAULT_BF16
    assert optimizers.resolve("adamw", torch.bfloat16) == "adamw"


@pytest.mark.parametrize("name", ["adamw", "adamw-kahan"])
def test_small_bf16_updates_land_only_with_compensation(name):
    """A bf16 weight of 0.068 (half an ulp is 2.4e-4) under a constant gradient:
    each Adam step moves it by lr = 4e-5 exactly (m_hat / sqrt(v_hat) = 1), a
    sixth of half an ulp. Over 120 steps the exact weight moves by 4.8e-3
    (about ten ulps); plain AdamW rounds every step away, Kahan compensation
    carries the remainder and lands the total to within one ulp."""
    weight = torch.nn.Parameter(torch.full((64,), 0.068, dtype=torch.bfloat16))
    start = weight.detach().float().clone()
    optimizer, _ = optimizers.build(name, [weight], 4e-5, 0.0, torch.bfloat16)
    for _ in range(120):
        weight.grad = torch.full_like(weight, 0.5)
        optimizer.step()
    moved = (start - weight.detach().float()).mean().item()
    if name == "adamw":
        assert moved == 0.0, "every update rounded away"
    else:
        assert moved == pytest.approx(120 * 4e-5, abs=4.9e-4)


def test_a_missing_library_is_a_usage_error_before_loading(llada_dir, forget_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the torchao package; pip install 'mdu-cli\[torchao\]'"):
        optimizers.check_available("adamw-8bit")
    before = snapshot(forget_file)
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--out",
                                      str(tmp_path / "out"), "--optimizer", "adamw-sr", "--max-steps", "1"])
    assert result.exit_code == 2 and "--optimizer adamw-sr needs the torchao package" in result.stderr
    assert snapshot(forget_file) == before and not (tmp_path / "out").exists()


def _run(llada_dir, forget_file, retain_file, out, *extra):
    return CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--retain",
                                    str(retain_file), "--out", str(out), "--max-steps", "6", "--batch-size", "1",
                                    "--grad-accum", "1", "--lr", "1e-3", "--device", "cpu", *extra])


@pytest.mark.parametrize("dtype, optimizer, recorded", [("fp32", "auto", "adamw"), ("bf16", "auto", "adamw-kahan"),
                                                        ("bf16", "adamw", "adamw"), ("bf16", "adamw-sr", "adamw-sr"),
                                                        ("bf16", "adamw-8bit", "adamw-8bit")])
def test_stopped_and_resumed_runs_end_with_the_uninterrupted_weights(dtype, optimizer, recorded, llada_dir,
                                                                     forget_file, retain_file, tmp_path,
                                                                     monkeypatch):
    """Stopped after step 3 (as Ctrl-C stops it) and resumed: bitwise the weights
    of an uninterrupted run, which needs every optimizer buffer back, the Kahan
    compensation of a bf16 run included; mdu_run.json names the optimizer."""
    options = ("--dtype", dtype, "--optimizer", optimizer)
    assert _run(llada_dir, forget_file, retain_file, tmp_path / "whole", *options).exit_code == 0
    import mdu_cli.train as train_module

    real_agreed = train_module.StopRequest.agreed
    calls = {"n": 0}

    def stop_after_third(self, accelerator):
        calls["n"] += 1
        return calls["n"] == 3 or real_agreed(self, accelerator)

    monkeypatch.setattr(train_module.StopRequest, "agreed", stop_after_third)
    out = tmp_path / "resumed"
    result = _run(llada_dir, forget_file, retain_file, out, *options, "--save-every", "100")
    assert result.exit_code == 130 and "--resume" in result.stderr
    saved = torch.load(tmp_path / "resumed.mdu-state" / "training.pt", weights_only=True)["optimizer"]["state"]
    if recorded == "adamw-kahan":
        assert all("kahan_comp" in s for s in saved.values()), "the compensation buffers are in the state"
    monkeypatch.setattr(train_module.StopRequest, "agreed", real_agreed)
    result = _run(llada_dir, forget_file, retain_file, out, *options, "--save-every", "100", "--resume")
    assert result.exit_code == 0, result.stderr
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "bitwise the uninterrupted weights"
    record = json.loads((out / "mdu_run.json").read_text())["optimizer"]
    assert record["name"] == recorded and record["betas"] == [0.9, 0.999] and record["eps"] == 1e-8
    assert record.get("kahan_sum") is (True if recorded == "adamw-kahan" else None)


@pytest.mark.parametrize("family, method", [("llada", "mdu"), ("dream", "npo"), ("masked-lm", "mdu")])
def test_a_host_anchor_gives_the_same_weights(family, method, family_dirs, forget_file, retain_file, tmp_path):
    """--anchor-offload keeps the frozen anchor in host memory and moves each
    block to the device for its forward: the same computation, so the same
    weights, bit for bit (here the device is the CPU too; what it saves is GPU
    memory)."""
    runs = {}
    for name, extra in (("copy", []), ("host", ["--anchor-offload"])):
        result = _run(family_dirs[family], forget_file, retain_file, tmp_path / name, "--method", method, *extra)
        assert result.exit_code == 0, result.stderr
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.equal(runs["copy"][k], runs["host"][k]) for k in runs["copy"])
    assert json.loads((tmp_path / "host" / "mdu_run.json").read_text())["config"]["anchor_offload"] is True


def test_the_host_anchor_holds_the_starting_weights_off_the_model(llada_dir):
    from mdu_cli.loading import load_model, resolve_source
    from mdu_cli.unlearn import host_anchor

    source = resolve_source(str(llada_dir))
    model = load_model(source, True, torch.float32)
    anchor = host_anchor(model, source, True, torch.float32, "cpu")
    assert {p.device.type for p in anchor.parameters()} == {"meta"}, "no weight lives in the module itself"
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(anchor(input_ids=ids).logits, model(input_ids=ids).logits)
        next(model.parameters()).add_(1.0)  # training the model must not move the anchor
        assert not torch.equal(anchor(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("extra", [["--lora"], ["--method", "ga"]])
def test_anchor_offload_without_a_frozen_copy_is_a_usage_error(extra, llada_dir, forget_file, tmp_path):
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--out",
                                      str(tmp_path / "out"), "--anchor-offload", *extra])
    assert result.exit_code == 2 and "--anchor-offload applies to full MDU and NPO" in result.stderr
