"""benchmarks/gpu_acceptance.sh, the CLI end to end on an accelerator, run here
on the CPU so that it cannot rot between GPU runs."""

import importlib.util
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ["unlearn llada full", "unlearn dream full", "unlearn llada lora", "unlearn dream bf16 default optimizer",
            "unlearn llada bf16 in backward, checkpointed, anchor offloaded",
            "unlearn llada grad-accum 3, anchor in memory", "unlearn llada grad-accum 3, anchor streamed: the same weights",
            "finetune llada", "eval llada against its base", "eval tofu reference (the base)",
            "eval tofu with the reference", "generate dream", "diff base against unlearned", "push --dry-run",
            "eval cost, old against new", "gpu_check.py rows"]


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_acceptance_script_passes_on_the_cpu(tmp_path):
    out, work = tmp_path / "acceptance.json", tmp_path / "work"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh"), "--device", "cpu", "--out",
                           str(out), "--work", str(work)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = json.loads(out.read_text())
    failed = [(c["name"], c["problems"], c["stderr_tail"][-400:]) for c in report["checks"] if not c["ok"]]
    assert done.returncode == 0 and not failed, (done.stdout[-2000:], failed)
    assert [c["name"] for c in report["checks"]] == EXPECTED
    assert report["device"] == "cpu" and report["passed"] == len(EXPECTED) and report["failed"] == 0
    assert done.stdout.strip().splitlines()[-1] == f"{len(EXPECTED)} passed, 0 failed"
    # It ran the commands for real: their outputs are there, on the device asked for.
    record = json.loads((work / "llada-in-backward" / "mdu_run.json").read_text())
    assert record["device"] == "cpu" and record["dtype"] == "bf16" and record["optimizer"]["in_backward"] is True
    assert [row["model"] for row in report["gpu_check"]["runs"]] == ["tiny"] * 6
    assert all(row["tokens_per_s"] > 0 for row in report["gpu_check"]["runs"])
    streamed = [row for row in report["gpu_check"]["runs"] if row["mode"].endswith("anchor on host")]
    assert len(streamed) == 1 and streamed[0]["anchor_bytes_per_step"] > 0 and streamed[0]["step_ratio_to_in_memory"]


def test_a_check_fails_on_an_output_that_is_not_what_the_command_promised(tmp_path):
    """The checks read the output: a run record naming another device, a
    non-finite loss, or weights that did not move are each a failure."""
    driver = _driver()
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "README.md"):
        (out / name).write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    (out / "mdu_run.json").write_text(json.dumps({"device": "cpu", "dtype": "fp32", "optimizer": {"name": "adamw"}}))
    (out / "train_log.jsonl").write_text(json.dumps({"forget_loss": float("nan")}) + "\n")
    (out / "delta_report.json").write_text(json.dumps({"total": {"rel_l2": 0.0}}))
    result = {"stdout": json.dumps({"out_dir": str(out)}), "stderr": "Unlearning 3 records ... on cpu in fp32"}
    problems = driver.trained_output("cuda")(result)
    assert any("device 'cpu', not 'cuda'" in p for p in problems)
    assert any("did not say it runs on cuda" in p for p in problems)
    assert any("non-finite or missing losses" in p for p in problems)
    assert any("no weight moved" in p for p in problems)
    assert driver.trained_output("cpu", "fp32", {"name": "adamw-kahan"})(result) == [
        "optimizer name is 'adamw', not 'adamw-kahan'", "non-finite or missing losses: [nan]",
        "no weight moved (delta report total rel_l2 is 0)"]
    leaked = {"stdout": json.dumps({"upload": [{"path": "model.safetensors"}, {"path": "forget.jsonl"}]})}
    assert driver.push_plan(leaked) == ["the plan would upload data: ['forget.jsonl']"]


def test_gpu_check_flops_and_the_offload_ratio_by_hand():
    """The MFU's FLOP count (6 per parameter and trained token, 8 with
    checkpointing's recompute, 4 for LoRA's frozen base, plus the anchor's
    forward over the forget tokens) and the ratio line, which pairs each
    anchor-on-host row with the same mode in memory of the same model."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.step_flops(10, 3, 5, checkpointed=False, lora=False) == 6 * 10 * 8 + 2 * 10 * 3
    assert check.step_flops(10, 3, 5, checkpointed=True, lora=False) == 8 * 10 * 8 + 2 * 10 * 3
    assert check.step_flops(10, 3, 5, checkpointed=False, lora=True) == 4 * 10 * 8 + 2 * 10 * 3
    runs = [{"model": "8b", "mode": "full MDU, in backward", "step_s_median": 0.5},
            {"model": "1b", "mode": "full MDU, in backward", "step_s_median": 0.1},
            {"model": "8b", "mode": "full MDU, in backward, anchor on host", "step_s_median": 0.6}]
    [line] = check.offload_ratios(runs)
    assert runs[2]["step_ratio_to_in_memory"] == 1.2 and "8b" in line and "1.20x" in line
    assert check.peak_tflops("cpu", None) is None and check.peak_tflops("cuda", 500.0) == 500.0
