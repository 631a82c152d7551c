"""Several processes through accelerate on the CPU (gloo): DDP, and FSDP2
through tests/fsdp_launch.py. Shared forget order split across ranks, per-rank
retain draws, one writer, the anchor on every rank, interrupt and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FORGET_RECORDS, RETAIN_RECORDS, write_jsonl
from safetensors.torch import load_file

from mdu_cli.config.training import build_config
from mdu_cli.train.loop import plan_steps


def _launch_line(*accelerate_args):
    """`accelerate launch` of two processes, on a port of their own: a fixed
    default port can still be held by an earlier launch or another run."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args, "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


FSDP2 = ("--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "NO_WRAP")
FSDP2_PROGRAM = [str(Path(__file__).with_name("fsdp_launch.py"))]
# Every two-process run in this module trains with these options, so that the
# uninterrupted runs below serve as the reference of every test: each launch
# costs about 12 s of two cores, most of it importing torch three times.
STEPS = 12  # room to stop a run after its fourth step; every step costs every launch
TRAINING = ["--max-steps", str(STEPS), "--batch-size", "1", "--grad-accum", "1", "--lr", "1e-3", "--device", "cpu"]
LORA = ["--lora", "--lora-r", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _unlearn_args(data: Path, out: Path, *extra) -> list[str]:
    return ["unlearn", "--model", str(data / "model"), "--forget", str(data / "forget.jsonl"), "--retain",
            str(data / "retain.jsonl"), "--out", str(out), *TRAINING, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory, llada_dir) -> Path:
    directory = tmp_path_factory.mktemp("distributed-data")
    (directory / "model").symlink_to(llada_dir)
    write_jsonl(directory / "forget.jsonl", FORGET_RECORDS)
    write_jsonl(directory / "retain.jsonl", RETAIN_RECORDS)
    return directory


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory, llada_dir) -> dict:
    """The uninterrupted two-process runs every test compares against, each
    launched once: DDP, accelerate's FSDP settings on the CPU (which run DDP),
    FSDP2 (preceded, in the same processes, by the sharded-anchor check), and
    LoRA under DDP and FSDP2. name -> (output dir, completed process)."""
    from mdu_cli.model.loading import load_model, resolve_source

    root = tmp_path_factory.mktemp("uninterrupted")
    model = load_model(resolve_source(str(llada_dir)), True, torch.float32).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.tensor([[1, 7, 8, 9, 10, 11, 12, 5, 5, 5]])).logits, root / "want.pt")
    check_anchor = [FSDP2_PROGRAM[0], "--check-anchor", str(llada_dir), str(root / "want.pt")]
    runs = {
        "ddp": (_launch_line("--multi_gpu"), ["-m", "mdu_cli"], ["--json"]),
        "fsdp-settings": (_launch_line(*FSDP2), ["-m", "mdu_cli"], []),
        "fsdp2": (_launch_line(*FSDP2), check_anchor, []),
        "ddp-lora": (_launch_line("--multi_gpu"), ["-m", "mdu_cli"], LORA),
        "fsdp2-lora": (_launch_line(*FSDP2), FSDP2_PROGRAM, LORA),
    }
    done = {}
    for name, (launch, program, extra) in runs.items():
        proc = subprocess.run(launch + program + _unlearn_args(data, root / name, *extra), capture_output=True,
                              text=True, timeout=300, env=ENV)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        done[name] = (root / name, proc)
    return done


def test_plan_gives_every_rank_the_same_number_of_micro_batches():
    cfg = build_config({}, dict(model="m", forget="f", epochs=2, batch_size=2, grad_accum=2))
    plan = plan_steps(11, cfg, torch.Generator().manual_seed(0), processes=2)
    # 11 rows -> 6 micro-batches per epoch -> groups of 4 -> [4, 2] per epoch.
    assert [len(step) for step in plan] == [4, 2, 4, 2]
    for epoch in (plan[:2], plan[2:]):
        rows = sorted(i for step in epoch for micro in step for i in micro)
        assert rows == list(range(11))
    odd = plan_steps(5, build_config({}, dict(model="m", forget="f", epochs=1, batch_size=1, grad_accum=2)),
                     torch.Generator().manual_seed(0), processes=2)
    assert [len(step) for step in odd] == [4, 2]  # 5 micro-batches: the last group is padded to 2
    assert odd[1][1] == odd[0][0], "padding repeats the epoch's first micro-batch"


def test_two_processes_with_accelerate_launch(uninterrupted):
    out, proc = uninterrupted["ddp"]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # only the main process prints
    assert summary["steps"] == STEPS and summary["out_dir"] == str(out)
    assert proc.stderr.count("Unlearning 4 records") == 1, "one copy of every notice"

    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert [entry["step"] for entry in log] == list(range(1, STEPS + 1))
    assert all(entry["forget_rows"] == 2 for entry in log), "one micro-batch on each of two ranks"
    assert all(len(entry["retain_rows"]) == 2 for entry in log)
    assert any(entry["retain_rows"][0] != entry["retain_rows"][1] for entry in log), "ranks draw their own retain rows"
    record = json.loads((out / "mdu_run.json").read_text())
    assert record["steps"] == STEPS
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == [], "no second writer, no leftovers"


def _same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _launch(data, out, *extra, background=False, fsdp2=False):
    command = (_launch_line(*FSDP2) + FSDP2_PROGRAM if fsdp2 else _launch_line("--multi_gpu") + ["-m", "mdu_cli"]) \
        + _unlearn_args(data, out, *extra)
    if background:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                                start_new_session=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)


def _ctrl_c_after(process, out, steps: int) -> str:
    """Once the run writing `out` has logged `steps` steps, do what a terminal's
    Ctrl-C does (SIGINT to the launcher's process group), and return its stderr."""
    import glob
    import signal
    import time

    deadline = time.monotonic() + 120
    while True:
        logs = glob.glob(str(out.parent / f".{out.name}.partial-*" / "train_log.jsonl"))
        if logs and len(open(logs[0]).read().splitlines()) >= steps:
            break
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    return process.communicate(timeout=120)[1]


@pytest.fixture(scope="module")
def interrupted_twice(data, tmp_path_factory) -> dict:
    """One DDP run stopped twice, then finished: Ctrl-C after two steps (the
    ranks save together), resumed with --save-every 3 and killed with SIGKILL
    once it has saved a later state, resumed again to the end. Three launches
    for what two tests check."""
    import signal
    import time

    import psutil

    root = tmp_path_factory.mktemp("interrupted")
    out, state = root / "out", root / "out.mdu-state"
    seen: dict = {}
    process = _launch(data, out, background=True)
    seen["ctrl_c_stderr"] = _ctrl_c_after(process, out, steps=2)
    seen["out_after_ctrl_c"] = out.exists()
    seen["ctrl_c_step"] = json.loads((state / "progress.json").read_text())["step"]

    process = _launch(data, out, "--save-every", "3", "--resume", background=True)
    deadline = time.monotonic() + 120
    while json.loads((state / "progress.json").read_text())["step"] == seen["ctrl_c_step"]:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no later state saved in time"
        time.sleep(0.01)
    # The launcher and both ranks (torchrun may start the ranks in their own sessions).
    for proc in psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]:
        proc.send_signal(signal.SIGKILL)
    process.wait()
    seen["out_after_kill"] = out.exists()
    seen["kill_step"] = json.loads((state / "progress.json").read_text())["step"]

    seen["final"] = _launch(data, out, "--save-every", "3", "--resume")
    seen["out"], seen["state"] = out, state
    return seen


def test_two_process_ctrl_c_saves_state_and_resumes_to_the_uninterrupted_weights(interrupted_twice, uninterrupted):
    """Ctrl-C reaches the launcher, which passes SIGINT on to each worker (they
    run in sessions of their own): every rank finishes its step, they agree on
    it, save collectively and exit."""
    run = interrupted_twice
    assert run["ctrl_c_stderr"].count("the state is saved in") == 1, run["ctrl_c_stderr"][-3000:]
    assert not run["out_after_ctrl_c"]
    assert 2 <= run["ctrl_c_step"] < STEPS
    assert run["final"].returncode == 0, run["final"].stderr[-3000:]
    assert _same_weights(uninterrupted["ddp"][0], run["out"]), "bitwise the uninterrupted weights"
    log = [json.loads(line) for line in (run["out"] / "train_log.jsonl").open()]
    assert [entry["step"] for entry in log] == list(range(1, STEPS + 1))


def test_two_process_run_killed_and_resumed_matches_an_uninterrupted_one(interrupted_twice, uninterrupted):
    run = interrupted_twice
    assert not run["out_after_kill"], "no output from a killed run"
    assert run["ctrl_c_step"] < run["kill_step"] < STEPS and run["kill_step"] % 3 == 0
    assert run["final"].returncode == 0, run["final"].stderr[-3000:]
    assert _same_weights(uninterrupted["ddp"][0], run["out"]), "bitwise the uninterrupted weights"
    assert not run["state"].exists()


def test_fsdp_runs_match_ddp_runs(uninterrupted, llada_dir):
    """Full MDU and LoRA MDU under FSDP2 (sharded anchor; adapter-off anchor)
    against the same runs under DDP. Also accelerate's FSDP settings on the
    CPU, where it runs DDP but transformers still reads real weights on rank 0
    only: the anchor is broadcast from rank 0, so that run equals plain DDP bit
    for bit (without the broadcast: 4e-3 apart)."""
    weights = {name: load_file(out / "model.safetensors") for name, (out, _) in uninterrupted.items()}
    base = load_file(llada_dir / "model.safetensors")

    def gap(a, b):
        return max((weights[a][k] - weights[b][k]).abs().max().item() for k in base)

    assert all(torch.equal(weights["ddp"][k], weights["fsdp-settings"][k]) for k in base)
    assert gap("ddp", "fsdp2") < 1e-6, "FSDP2 differs from DDP by more than summation order"
    assert gap("ddp-lora", "fsdp2-lora") < 1e-6
    moved = max((weights["fsdp2"][k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3, "the runs moved the weights"


def test_fsdp2_sharded_anchor_is_the_base_on_every_rank(uninterrupted):
    """Checked by tests/fsdp_anchor_check.py in the processes of the FSDP2 run."""
    import re

    stdout = uninterrupted["fsdp2"][1].stdout
    found = sorted(re.findall(r"rank (\d): rank0_only=(\w+) max_diff=([0-9.e+-]+?)(?=rank|\s|$)", stdout))
    assert [(rank, only) for rank, only, _ in found] == [("0", "False"), ("1", "True")], stdout
    # Float noise only (the reference ran on other threads); garbage weights are off by orders of magnitude.
    assert all(float(diff) < 1e-5 for _, _, diff in found), stdout


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp2_ctrl_c_then_resume_gives_the_uninterrupted_weights(data, uninterrupted, tmp_path, mode):
    """Under FSDP2 the state is saved from torch's full state dicts (gathered
    shards of the weights and optimizer) and re-sharded on resume."""
    extra = ["--save-every", "3"] + (LORA if mode == "lora" else [])
    out = tmp_path / "stopped"
    process = _launch(data, out, *extra, background=True, fsdp2=True)
    stderr = _ctrl_c_after(process, out, steps=4)
    assert "the state is saved in" in stderr, stderr[-3000:]
    state = tmp_path / "stopped.mdu-state"
    assert 4 <= json.loads((state / "progress.json").read_text())["step"] < STEPS

    resumed = _launch(data, out, *extra, "--resume", fsdp2=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = uninterrupted["fsdp2-lora" if mode == "lora" else "fsdp2"][0]
    assert _same_weights(reference, out), "bitwise the uninterrupted weights"
    assert not state.exists()


def test_joint_accounting_under_ddp_runs_one_backward_per_micro_batch(data, tmp_path):
    """Joint accounting gives ranks micro-batches of different kinds (one a
    forget row, the other a retain row); each still runs exactly one backward,
    a collective, so the launch completes instead of hanging."""
    out = tmp_path / "joint"
    proc = subprocess.run(_launch_line("--multi_gpu") + ["-m", "mdu_cli"]
                          + _unlearn_args(data, out, "--batch-accounting", "joint", "--max-steps", "6"),
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert len(log) == 6
    per_step = [(entry["forget_rows"], sum(len(r) for r in entry["retain_rows"])) for entry in log]
    assert all(f + r == 2 for f, r in per_step), per_step
    assert any(f == 1 for f, _ in per_step), "some step gave the ranks one row of each kind"


def test_finetune_under_ddp(data, tmp_path):
    """`mdu finetune` runs on the same multi-process machinery: two ranks, one
    writer, each step's rows split across them."""
    out = tmp_path / "tuned"
    proc = subprocess.run(_launch_line("--multi_gpu") + ["-m", "mdu_cli", "finetune", "--model", str(data / "model"),
                                                         "--data", str(data / "forget.jsonl"), "--out", str(out),
                                                         *TRAINING, "--max-steps", "4", "--json"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Fine-tuning") == 1, "one copy of every notice"
    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert [e["forget_rows"] for e in log] == [2, 2, 2, 2] and all(e["retain_loss"] is None for e in log)
    assert json.loads((out / "mdu_run.json").read_text())["command"] == "finetune"


@pytest.mark.parametrize("launcher", ["ddp", "fsdp2"])
def test_bf16_kahan_ctrl_c_and_resume_gives_the_uninterrupted_weights(data, tmp_path, launcher):
    """The default bf16 optimizer keeps a compensation buffer per weight; with
    two processes it is saved by the main process (under FSDP2 gathered from
    the ranks' shards) and restored on every rank, so a run stopped with Ctrl-C
    and resumed ends bitwise where an uninterrupted one does."""
    bf16 = ("--dtype", "bf16", "--max-steps", "6")
    fsdp2 = launcher == "fsdp2"
    whole = _launch(data, tmp_path / "whole", *bf16, fsdp2=fsdp2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "out"
    process = _launch(data, out, *bf16, background=True, fsdp2=fsdp2)
    stderr = _ctrl_c_after(process, out, steps=2)
    assert stderr.count("the state is saved in") == 1, stderr[-3000:]
    saved = torch.load(tmp_path / "out.mdu-state" / "training.pt", weights_only=True)["optimizer"]["state"]
    assert saved and all("kahan_comp" in state for state in saved.values()), "the compensation is in the state"
    resumed = _launch(data, out, *bf16, "--resume", fsdp2=fsdp2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "mdu_run.json").read_text())["optimizer"]["name"] == "adamw-kahan"
    assert _same_weights(tmp_path / "whole", out), "bitwise the uninterrupted weights"
