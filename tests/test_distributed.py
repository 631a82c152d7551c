"""Several processes through accelerate (DDP, gloo on the CPU): shared forget
order split across ranks, per-rank retain draws, one writer."""

import json
import os
import subprocess
import sys

from mdu_cli.config import build_config
from mdu_cli.train import plan_steps

import torch


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


def test_two_processes_with_accelerate_launch(llada_dir, forget_file, retain_file, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "mdu_cli", "unlearn", "--model", str(llada_dir), "--forget", str(forget_file),
               "--retain", str(retain_file), "--out", str(out), "--max-steps", "4", "--batch-size", "1",
               "--grad-accum", "1", "--lr", "1e-3", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # only the main process prints
    assert summary["steps"] == 4 and summary["out_dir"] == str(out)
    assert proc.stderr.count("Unlearning 4 records") == 1, "one copy of every notice"

    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    assert all(entry["forget_rows"] == 2 for entry in log), "one micro-batch on each of two ranks"
    assert all(len(entry["retain_rows"]) == 2 for entry in log)
    assert any(entry["retain_rows"][0] != entry["retain_rows"][1] for entry in log), "ranks draw their own retain rows"
    record = json.loads((out / "mdu_run.json").read_text())
    assert record["steps"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no second writer, no leftovers"


def _launch(llada_dir, forget_file, retain_file, out, *extra, background=False):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "mdu_cli", "unlearn", "--model", str(llada_dir), "--forget", str(forget_file),
               "--retain", str(retain_file), "--out", str(out), "--max-steps", "30", "--batch-size", "1",
               "--grad-accum", "1", "--lr", "1e-3", "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_two_process_run_killed_and_resumed_matches_an_uninterrupted_one(llada_dir, forget_file, retain_file,
                                                                         tmp_path):
    import signal
    import time

    from safetensors.torch import load_file

    straight = _launch(llada_dir, forget_file, retain_file, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    out, state = tmp_path / "killed", tmp_path / "killed.mdu-state"
    process = _launch(llada_dir, forget_file, retain_file, out, "--save-every", "3", background=True)
    deadline = time.monotonic() + 120
    while not (state / "progress.json").is_file():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no state saved in time"
        time.sleep(0.01)
    import psutil

    # The launcher and both ranks (torchrun may start the ranks in their own sessions).
    for proc in psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]:
        proc.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    saved = json.loads((state / "progress.json").read_text())["step"]
    assert 3 <= saved < 30

    resumed = _launch(llada_dir, forget_file, retain_file, out, "--save-every", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "bitwise the uninterrupted weights"
    assert not state.exists()


def test_full_model_mdu_under_fsdp_is_refused(llada_dir, forget_file, monkeypatch):
    from click.testing import CliRunner

    from mdu_cli.cli import cli

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file),
                                      "--max-steps", "1"])
    assert result.exit_code == 2 and "under FSDP is not supported yet" in result.stderr
