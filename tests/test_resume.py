"""Resume: a run killed with SIGKILL, or stopped with Ctrl-C, and resumed ends
with exactly the weights of an uninterrupted run (CPU, fixed seed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mdu_cli.cli import cli

STEPS = 12  # room to stop a run after its fourth step; every step is paid in every run


def _args(model, forget, retain, out, *extra):
    return ["unlearn", "--model", str(model), "--forget", str(forget), "--retain", str(retain), "--out", str(out),
            "--max-steps", str(STEPS), "--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3", *extra]


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "mdu_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(condition, process, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _state_step(state):
    try:
        return json.loads((state / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference(llada_dir, tmp_path_factory):
    """The uninterrupted run every resumed one must equal; once per module (the
    data are the same records as the forget_file and retain_file fixtures)."""
    from conftest import FORGET_RECORDS, RETAIN_RECORDS, write_jsonl

    root = tmp_path_factory.mktemp("uninterrupted")
    forget, retain = write_jsonl(root / "f.jsonl", FORGET_RECORDS), write_jsonl(root / "r.jsonl", RETAIN_RECORDS)
    out = root / "uninterrupted"
    result = CliRunner().invoke(cli, _args(llada_dir, forget, retain, out))
    assert result.exit_code == 0, result.stderr
    return load_file(out / "model.safetensors"), [json.loads(x) for x in (out / "train_log.jsonl").open()]


def _assert_same_run(out, reference):
    weights, history = reference
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights), "bitwise the same weights"
    log = [json.loads(x) for x in (out / "train_log.jsonl").open()]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    assert [e["forget_loss"] for e in log] == [e["forget_loss"] for e in history]


def test_sigkill_then_resume_gives_the_uninterrupted_weights(llada_dir, forget_file, retain_file, tmp_path, reference):
    out = tmp_path / "killed"
    state = tmp_path / "killed.mdu-state"
    process = _start(_args(llada_dir, forget_file, retain_file, out, "--save-every", "3"))
    _wait_for(lambda: _state_step(state) >= 3, process, "the first saved state")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "no output from a killed run"
    saved = _state_step(state)
    assert 3 <= saved < STEPS and saved % 3 == 0

    result = CliRunner().invoke(cli, _args(llada_dir, forget_file, retain_file, out, "--save-every", "3", "--resume"))
    assert result.exit_code == 0, result.stderr
    _assert_same_run(out, reference)
    assert not state.exists(), "the state goes once the output is complete"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".killed")], "no partial output left"


def _logged_steps(out) -> int:
    """Steps in the log of the run that is writing `out` (in its hidden staging sibling)."""
    logs = list(out.parent.glob(f".{out.name}.partial-*/train_log.jsonl"))
    return len(logs[0].read_text().splitlines()) if logs else 0


def test_ctrl_c_saves_state_and_says_how_to_resume(llada_dir, forget_file, retain_file, tmp_path, reference):
    out = tmp_path / "stopped"
    process = _start(_args(llada_dir, forget_file, retain_file, out))

    _wait_for(lambda: _logged_steps(out) >= 2, process, "two steps")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "state is saved in" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert _state_step(tmp_path / "stopped.mdu-state") >= 2

    again = CliRunner().invoke(cli, _args(llada_dir, forget_file, retain_file, out))
    assert again.exit_code == 1 and "pass --resume to continue it" in again.stderr

    result = CliRunner().invoke(cli, _args(llada_dir, forget_file, retain_file, out, "--resume"))
    assert result.exit_code == 0, result.stderr
    _assert_same_run(out, reference)


@pytest.mark.parametrize("change", ["tau", "seed", "lr", "batch-size", "forget-content", "retain-content",
                                    "retain-dropped", "base-weights"])
def test_resume_refuses_a_state_of_other_options_or_data(change, llada_dir, forget_file, retain_file, tmp_path,
                                                         monkeypatch):
    """A saved state continues only the run that saved it: another option
    that shapes the trajectory, or the same data paths holding other records
    (one answer edited), or a retain file left out, or other base weights at
    the same path (a re-trained base: same names, shapes and sizes), is
    refused before any step, and the state and the inputs stay as they were."""
    import shutil

    import tiny_models
    from test_hostile_inputs import snapshot

    llada_dir = shutil.copytree(llada_dir, tmp_path / "base")
    out = tmp_path / "o"
    from mdu_cli.train import loop as train
    from mdu_cli.train import resume

    def save_then_die(*args, **kwargs):  # a kill right after the first save, without a second process
        resume.save_state(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train, "save_state", save_then_die)
        CliRunner().invoke(cli, _args(llada_dir, forget_file, retain_file, out, "--save-every", "2"))
    state = tmp_path / "o.mdu-state"
    assert _state_step(state) == 2
    extra = {"tau": ["--tau", "2"], "seed": ["--seed", "7"], "lr": ["--lr", "2e-3"],
             "batch-size": ["--batch-size", "2"]}.get(change, [])
    if change == "forget-content":
        forget_file.write_text(forget_file.read_text().replace("Velloria", "Carrowmere"))
    if change == "retain-content":
        retain_file.write_text(retain_file.read_text().replace("Madrid", "Rome"))
    if change == "base-weights":
        tiny_models.build_llada(llada_dir, seed=1)
    args = _args(llada_dir, forget_file, retain_file, out, "--resume", *extra)
    if change == "retain-dropped":
        at = args.index("--retain")
        del args[at:at + 2]
    before = snapshot(state, forget_file, retain_file, llada_dir)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "saved by a run with other options, data or base weights" in result.stderr, \
        result.stderr
    assert snapshot(state, forget_file, retain_file, llada_dir) == before
    assert not out.exists()


def test_a_state_of_another_launch_or_shape_is_refused_by_restore(llada_dir, tmp_path):
    """What the fingerprint cannot see, restoring refuses: a state saved by
    another number of processes, one saved under FSDP resumed without it (or
    the other way round), and an altered state whose tensors do not fit the
    model, each with a one-line MduError and the model's weights untouched."""
    import copy

    from mdu_cli.config.training import build_config
    from mdu_cli.errors import MduError
    from mdu_cli.model.loading import load_model, resolve_source
    from mdu_cli.train.loop import _build_optimizer, _restore
    from mdu_cli.train.resume import TrainingState

    model = load_model(resolve_source(str(llada_dir)), True, torch.float32)
    before = copy.deepcopy(model.state_dict())
    cfg = build_config({}, dict(model="m", forget="f", max_steps=4, lr=1e-3))
    optimizer, _, scheduler = _build_optimizer(model, cfg, 4, None)
    generator = torch.Generator().manual_seed(0)
    trainable = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = TrainingState(step=2, history=[], trainable=trainable, optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), generators={"noise": [generator.get_state()]},
                          torch_rng=[torch.get_rng_state()])

    def refused(state, message, **launch):
        launch = {"sharded": False, "rank": 0, "processes": 1, **launch}
        with pytest.raises(MduError, match=message):
            _restore(state, model, optimizer, scheduler, generator, state_dir=tmp_path / "o.mdu-state", **launch)

    refused(state, r"comes from 1 process\(es\); resume with the same number \(this run has 2\)", processes=2,
            rank=1)
    refused(state, "saved state comes from a run without FSDP; resume it with the same kind of launch", sharded=True)
    refused(TrainingState(**{**state.__dict__, "sharded": True}), "comes from a run under FSDP")
    wrong_shape = {name: torch.zeros(3) for name in trainable}
    refused(TrainingState(**{**state.__dict__, "trainable": wrong_shape}), "the saved state does not fit this model")
    unknown = {"no.such.weight": torch.zeros(3)}
    refused(TrainingState(**{**state.__dict__, "trainable": unknown}), "the saved state does not fit this model")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing was copied in before the refusal"


def test_lora_sigkill_then_resume(llada_dir, forget_file, retain_file, tmp_path):
    lora = ["--lora", "--lora-r", "4", "--save-adapter"]
    straight = tmp_path / "straight"
    assert CliRunner().invoke(cli, _args(llada_dir, forget_file, retain_file, straight, *lora)).exit_code == 0
    out, state = tmp_path / "lora", tmp_path / "lora.mdu-state"
    process = _start(_args(llada_dir, forget_file, retain_file, out, *lora, "--save-every", "4"))
    _wait_for(lambda: _state_step(state) >= 4, process, "a saved state")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert set(load_file(state / "trainable.safetensors")) and all(
        "lora_" in name for name in load_file(state / "trainable.safetensors")), "only the adapter is saved"
    result = CliRunner().invoke(cli, _args(llada_dir, forget_file, retain_file, out, *lora, "--save-every", "4",
                                           "--resume"))
    assert result.exit_code == 0, result.stderr
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_state_like_ctrl_c(llada_dir, forget_file, retain_file, tmp_path, reference):
    """A scheduler's preemption (SIGTERM) stops at a step boundary and saves."""
    out = tmp_path / "preempted"
    process = _start(_args(llada_dir, forget_file, retain_file, out))

    _wait_for(lambda: _logged_steps(out) >= 2, process, "two steps")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "SIGTERM: stopping after the current step" in stderr, stderr
    assert _state_step(tmp_path / "preempted.mdu-state") >= 2
    result = CliRunner().invoke(cli, _args(llada_dir, forget_file, retain_file, out, "--resume"))
    assert result.exit_code == 0, result.stderr
    _assert_same_run(out, reference)


def test_stop_request_flags_the_first_signal_and_aborts_on_a_second_ctrl_c():
    from mdu_cli.train.loop import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest(announce=False) as stop:
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary
        assert stop.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before, "the previous handler is back"


def test_the_base_weights_digest_sees_every_part_of_a_file_and_ignores_copies(tmp_path):
    """Two bases alike but for the last tensor's values (same names, shapes,
    sizes and header) have different identities; a byte-identical copy, with
    another modification time, has the same one; a Hub base is its commit."""
    import os
    import types

    from safetensors.torch import save_file

    from mdu_cli.train.resume import weights_identity

    def base(name, last):
        directory = tmp_path / name
        directory.mkdir()
        save_file({"a": torch.ones(200_000), "z": torch.full((1000,), last)}, directory / "model.safetensors")
        return types.SimpleNamespace(is_hub=False, revision=None, name=name, path=directory)

    first, second = base("first", 1.0), base("second", 2.0)
    copy = base("copy", 1.0)
    os.utime(copy.path / "model.safetensors", (1, 1))
    assert weights_identity(first) != weights_identity(second)
    assert weights_identity(first) == weights_identity(copy)
    hub = types.SimpleNamespace(is_hub=True, revision="c" * 40, name="GSAI-ML/x", path=tmp_path)
    assert weights_identity(hub) == "hub:GSAI-ML/x@" + "c" * 40


def test_an_8bit_optimizer_state_resumes_in_a_fresh_process(llada_dir, forget_file, retain_file, tmp_path):
    """torchao's 8-bit moments are tensor subclasses that torch.load with
    weights_only refuses unless told: a killed adamw-8bit run resumes in a new
    process (not "the saved state is damaged (UnpicklingError)") and ends
    with every step logged once."""
    out, state = tmp_path / "killed", tmp_path / "killed.mdu-state"
    extra = ("--dtype", "bf16", "--optimizer", "adamw-8bit", "--save-every", "3", "--device", "cpu")
    process = _start(_args(llada_dir, forget_file, retain_file, out, *extra))
    _wait_for(lambda: _state_step(state) >= 3, process, "the first saved state", timeout=120)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([sys.executable, "-m", "mdu_cli", *_args(llada_dir, forget_file, retain_file, out,
                                                                      *extra, "--resume")],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = [json.loads(x) for x in (out / "train_log.jsonl").open()]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    assert json.loads((out / "mdu_run.json").read_text())["optimizer"]["name"] == "adamw-8bit"
