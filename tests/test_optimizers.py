"""--optimizer: the choice for the weights' precision, the record, and resume
of every optimizer buffer (Kahan compensation included)."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_hostile_inputs import snapshot

from mdu_cli.cli import cli
from mdu_cli.errors import ConfigError
from mdu_cli.train import optimizers


def test_auto_takes_adamw_for_fp32_and_the_kahan_adamw_for_bf16():
    assert optimizers.resolve("auto", torch.float32) == "adamw"
    assert optimizers.resolve("auto", torch.bfloat16) == "adamw-kahan" == optimizers.DEFAULT_BF16
    assert optimizers.resolve("adamw", torch.bfloat16) == "adamw"
    # Stepping inside backward takes torch-optimi's AdamW whatever the dtype; nothing else can.
    assert optimizers.resolve("auto", torch.float32, in_backward=True) == "adamw-kahan" == optimizers.IN_BACKWARD
    with pytest.raises(ConfigError, match="--optimizer-in-backward needs --optimizer adamw-kahan"):
        optimizers.build("adamw", [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0, torch.float32, in_backward=True)


@pytest.mark.numerics
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
                                                        ("bf16", "adamw-8bit", "adamw-8bit"),
                                                        ("bf16", "in-backward", "adamw-kahan"),
                                                        ("fp32", "anchor-offload", "adamw"),
                                                        ("fp32", "anchor-offload-ahead", "adamw")])
def test_stopped_and_resumed_runs_end_with_the_uninterrupted_weights(dtype, optimizer, recorded, llada_dir,
                                                                     forget_file, retain_file, tmp_path,
                                                                     monkeypatch):
    """Stopped after step 3 (as Ctrl-C stops it) and resumed: bitwise the weights
    of an uninterrupted run, which needs every optimizer buffer back, the Kahan
    compensation of a bf16 run included (and, stepping in backward, each
    parameter's own step count); mdu_run.json names the optimizer."""
    options = ("--dtype", dtype, *(IN_BACKWARD if optimizer == "in-backward" else ("--optimizer", optimizer)))
    if optimizer.startswith("anchor-offload"):  # the streamed anchor, several micro-batches per pass
        options = ("--dtype", dtype, "--anchor-offload", "--grad-accum", "2")
        if optimizer.endswith("ahead"):  # its passes a step ahead, as on CUDA: the next step's masks drawn early
            run_ahead(monkeypatch)
    assert _run(llada_dir, forget_file, retain_file, tmp_path / "whole", *options).exit_code == 0
    import mdu_cli.train.loop as train_module

    real_agreed = train_module.StopRequest.agreed
    calls = {"n": 0}

    def stop_after_third(self, accelerator):
        calls["n"] += 1
        return calls["n"] == 3 or real_agreed(self, accelerator)

    monkeypatch.setattr(train_module.StopRequest, "agreed", stop_after_third)
    out = tmp_path / "resumed"
    result = _run(llada_dir, forget_file, retain_file, out, *options, "--save-every", "100")
    assert result.exit_code == 130 and "--resume" in result.stderr
    from mdu_cli.train.resume import read_training_file

    saved = read_training_file(tmp_path / "resumed.mdu-state" / "training.pt")["optimizer"]["state"]
    if recorded == "adamw-kahan":
        assert all("kahan_comp" in s for s in saved.values()), "the compensation buffers are in the state"
    if optimizer == "in-backward":
        assert all(int(s["step"]) == 3 and "group" not in s for s in saved.values())
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
    from mdu_cli.model.loading import load_model, resolve_source
    from mdu_cli.train.run import host_anchor

    source = resolve_source(str(llada_dir))
    model = load_model(source, True, torch.float32)
    anchor = host_anchor(model, source, True, torch.float32, "cpu")
    stored = {t.data_ptr() for block in anchor._host for _, t in block}
    assert all(p.data_ptr() in stored for block in anchor.units for p in block.parameters()), \
        "between passes every block's weights are the host copies"
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(anchor(input_ids=ids).logits, model(input_ids=ids).logits)
        assert all(p.data_ptr() in stored for block in anchor.units for p in block.parameters()), "released after"
        next(model.parameters()).add_(1.0)  # training the model must not move the anchor
        assert not torch.equal(anchor(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("extra", [["--lora"], ["--method", "ga"]])
def test_anchor_offload_without_a_frozen_copy_is_a_usage_error(extra, llada_dir, forget_file, tmp_path):
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--out",
                                      str(tmp_path / "out"), "--anchor-offload", *extra])
    assert result.exit_code == 2 and "--anchor-offload applies to full MDU and NPO" in result.stderr


IN_BACKWARD = ("--optimizer-in-backward", "--max-grad-norm", "0")


def run_ahead(monkeypatch) -> None:
    """Streamed anchors pass a step ahead, in the background, on the CPU too."""
    from mdu_cli.model.streamed_anchor import StreamedAnchor

    real = StreamedAnchor.__init__
    monkeypatch.setattr(StreamedAnchor, "__init__", lambda self, module, device, ahead=None: real(self, module,
                                                                                                  device, True))


@pytest.mark.numerics
@pytest.mark.parametrize("family, dtype, extra", [
    ("llada", "fp32", []), ("llada", "fp32", ["--gradient-checkpointing"]), ("llada", "bf16", []),
    ("dream", "fp32", ["--batch-accounting", "joint"]), ("dream", "bf16", ["--gradient-checkpointing"]),
    ("masked-lm", "fp32", ["--method", "npo"]),
])
def test_stepping_in_backward_gives_the_weights_of_an_ordinary_step(family, dtype, extra, family_dirs, forget_file,
                                                                     retain_file, tmp_path):
    """The same AdamW (torch-optimi's, Kahan on bf16) stepped inside backward,
    parameter by parameter, against one ordinary step over the whole gradient:
    forget and retain rows go through one forward and one backward instead of
    two each, so the gradients are the same sums taken in another order:
    equal to fp32 rounding. bf16 forwards of another batch shape round apart,
    which six steps at lr 1e-3 amplify, hence the looser bound there. The
    logged gradient norm is the whole gradient's."""
    common = ("--dtype", dtype, "--optimizer", "adamw-kahan", "--max-grad-norm", "0", *extra)
    runs, logs = {}, {}
    for name, flags in (("ordinary", ()), ("in_backward", ("--optimizer-in-backward",))):
        out = tmp_path / name
        result = _run(family_dirs[family], forget_file, retain_file, out, *common, *flags)
        assert result.exit_code == 0, result.stderr
        runs[name] = load_file(out / "model.safetensors")
        logs[name] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    base = load_file(family_dirs[family] / "model.safetensors")
    deltas = {name: torch.cat([(run[k].double() - base[k].double()).flatten() for k in sorted(base)])
              for name, run in runs.items()}
    if dtype == "fp32":
        for key, ordinary in runs["ordinary"].items():
            moved = (ordinary.double() - base[key].double()).norm()
            assert (ordinary.double() - runs["in_backward"][key].double()).norm() <= 1e-5 * moved + 1e-9, key
    else:  # as benchmarks/bf16_fidelity.py compares runs: the whole weight change
        cosine = torch.nn.functional.cosine_similarity(deltas["ordinary"], deltas["in_backward"], dim=0)
        assert cosine > 0.97 and deltas["in_backward"].norm() / deltas["ordinary"].norm() == pytest.approx(1, abs=0.05)
    assert any(not torch.equal(runs["ordinary"][k], base[k]) for k in base), "the runs moved the weights"
    for ordinary, fused in zip(logs["ordinary"], logs["in_backward"], strict=True):
        assert fused["grad_norm"] == pytest.approx(ordinary["grad_norm"], rel=1e-3 if dtype == "fp32" else 5e-2)
        if ordinary["forget_loss"] is None:  # joint accounting: a step of retain rows only
            assert fused["forget_loss"] is None
        else:
            assert fused["forget_loss"] == pytest.approx(ordinary["forget_loss"], rel=1e-4 if dtype == "fp32" else 5e-2)
    record = json.loads((tmp_path / "in_backward" / "mdu_run.json").read_text())
    assert record["optimizer"]["in_backward"] is True and record["config"]["optimizer_in_backward"] is True
    assert record["optimizer"]["kahan_sum"] is (dtype == "bf16")


def test_no_full_set_of_gradients_exists_in_backward(llada_dir):
    """Each gradient is applied and freed as soon as it is complete: when any
    parameter's gradient arrives, no other parameter holds one, and after
    backward none does; every parameter stepped exactly once per backward,
    gradient checkpointing (recomputation inside backward) included."""
    from mdu_cli.model.checkpointing import enable_gradient_checkpointing
    from mdu_cli.model.loading import load_model, resolve_source

    model = load_model(resolve_source(str(llada_dir)), True, torch.bfloat16)
    enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = optimizers.build("adamw-kahan", params, 1e-3, 0.0, torch.bfloat16, in_backward=True)
    others_holding = []
    for p in params:  # registered first, so it runs before the step frees the gradient
        p.register_post_accumulate_grad_hook(
            lambda q: others_holding.append(sum(o.grad is not None for o in params if o is not q)))
    stepper = optimizers.StepInBackward(model, optimizer)
    ids = torch.tensor([[1, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16]])
    before = [p.detach().clone() for p in params]
    for step in range(1, 3):
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        assert all(p.grad is None for p in params)
        assert stepper.grad_norm() > 0
        assert all(int(optimizer.state[p]["step"]) == step for p in params), "one step per backward"
    assert len(others_holding) == 2 * len(params) and max(others_holding) == 0
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    stepper.remove()
    assert all(not p._post_accumulate_grad_hooks or len(p._post_accumulate_grad_hooks) == 1 for p in params)


@pytest.mark.parametrize("flags, message", [
    (["--grad-accum", "4"], "--grad-accum must be 1 with --optimizer-in-backward"),
    (["--grad-accum", "1"], "--max-grad-norm must be 0 with --optimizer-in-backward"),
    (["--grad-accum", "1", "--max-grad-norm", "0", "--optimizer", "adamw"], "--optimizer adamw cannot step inside"),
    (["--grad-accum", "1", "--max-grad-norm", "0", "--dtype", "fp16"], "--dtype fp16 scales the loss"),
    (["--grad-accum", "1", "--max-grad-norm", "0", "WORLD_SIZE=2"], "--optimizer-in-backward runs in one process"),
])
def test_options_that_need_a_whole_gradient_are_refused_in_backward(flags, message, llada_dir, forget_file,
                                                                    retain_file, tmp_path, monkeypatch):
    """A step in backward never sees the whole gradient at once: accumulation,
    global-norm clipping, loss scaling and a DDP average are usage errors,
    named before any weight loads, never quietly changed."""
    env = [f for f in flags if "=" in f]
    for item in env:
        monkeypatch.setenv(*item.split("="))
    before = snapshot(forget_file, retain_file)
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--retain",
                                      str(retain_file), "--out", str(tmp_path / "out"), "--optimizer-in-backward",
                                      *[f for f in flags if "=" not in f]])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert snapshot(forget_file, retain_file) == before and not (tmp_path / "out").exists()


def test_clipping_off_logs_the_norm_and_clips_nothing(llada_dir, forget_file, retain_file, tmp_path):
    """--max-grad-norm 0 turns clipping off: the same run with a norm far
    above any gradient's gives the same weights, and the norm is logged."""
    runs = {}
    for name, norm in (("off", "0"), ("huge", "1e9")):
        assert _run(llada_dir, forget_file, retain_file, tmp_path / name, "--max-grad-norm", norm).exit_code == 0
        runs[name] = load_file(tmp_path / name / "model.safetensors")
        log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        assert all(entry["grad_norm"] > 0 for entry in log)
    assert all(torch.equal(runs["off"][k], runs["huge"][k]) for k in runs["off"])


def _adamw64(start: torch.Tensor, gradients: list, lr: float, weight_decay: float) -> torch.Tensor:
    """torch's AdamW written out in float64: decoupled decay lr x weight_decay,
    betas 0.9 / 0.999, eps 1e-8 added to the bias-corrected root."""
    weight, m, v = start.double().clone(), torch.zeros_like(start, dtype=torch.float64), \
        torch.zeros_like(start, dtype=torch.float64)
    for k, grad in enumerate(gradients, start=1):
        grad = grad.double()
        weight = weight * (1 - lr * weight_decay)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        weight = weight - lr * (m / (1 - 0.9 ** k)) / ((v / (1 - 0.999 ** k)).sqrt() + 1e-8)
    return weight


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["adamw", "adamw-kahan", "adamw-sr"])
def test_every_optimizer_runs_the_adamw_it_records(name):
    """Each choice, on fp32 weights (nothing to compensate or round), is
    exactly torch's AdamW with betas 0.9 / 0.999, eps 1e-8 and decoupled
    decay: ten steps of gradients whose scale changes, so that beta2 and eps
    both show, against a float64 AdamW; and the record (mdu_run.json) holds
    the hyperparameters the optimizer itself holds."""
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(256, generator=generator)
    gradients = [torch.randn(256, generator=generator) * (10.0 ** -(k % 4)) for k in range(10)]
    weight = torch.nn.Parameter(start.clone())
    optimizer, choice = optimizers.build(name, [weight], 1e-2, 0.1, torch.float32)
    for grad in gradients:
        weight.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(weight.detach().double(), _adamw64(start, gradients, 1e-2, 0.1), rtol=1e-5,
                               atol=1e-6)
    group = optimizer.param_groups[0]
    record = choice.record()
    assert record["name"] == name
    held = group["betas"] if "betas" in group else (group["beta1"], group["beta2"])  # torch-optimi's names
    assert record["betas"] == list(held) == [0.9, 0.999]
    assert record["eps"] == group["eps"] == 1e-8 and record["weight_decay"] == group["weight_decay"] == 0.1
    assert record["lr"] == 1e-2
