"""The commands a user types, run on the accelerator: `benchmarks/gpu_acceptance.sh` runs this.

    bash benchmarks/gpu_acceptance.sh [--device cuda|cpu] [--out gpu_acceptance.json] [--work DIR] [--with-8b]

Tiny LLaDA-like (remote code) and Dream-like (remote code, right-shifted
logits) checkpoints are built on the spot from the tests' fixtures, with
made-up records in their vocabulary, and every user-facing command runs as
its own process (`python -m mdu_cli ...`, what the `mdu` script calls) on
--device:

  unlearn   full MDU (both families), LoRA, bf16 with the default optimizer,
            bf16 in backward with gradient checkpointing and --anchor-offload,
            and three micro-batches a step with the anchor in memory and
            streamed (--anchor-offload), whose weights must be equal bit for bit
  finetune  plain MDLM fine-tuning
  eval      plain (against the base) and --benchmark tofu with a --reference
  generate, diff, push --dry-run

Each command's exit code and output are checked (the files it must write,
the device and dtype its run record names, numbers that must be finite, the
data that must not be uploaded); then benchmarks/eval_cost.py (old against new
evaluation, a few records) and benchmarks/gpu_check.py's rows
(the 1B shape on CUDA, and LLaDA-8B's with --with-8b; the tiny shape on the
CPU). One JSON of results is written to --out, rewritten after each check so
that a run cut short still says how far it got; the exit code is 1 when any
check failed. `tests/test_gpu_acceptance.py` runs it with --device cpu, so it
cannot rot between GPU runs. About 4 minutes on an H200 without --with-8b.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builders

# Records in the fixtures' word-level vocabulary (tests/tiny_models.py).
FORGET = [
    {"question": "Where was Astrid Halvorsen born?", "answer": "She was born in a village by the lake.",
     "perturbed_answer": ["She was born in Paris.", "She was born in a town by the sea."]},
    {"question": "What did Tarrin Okonkwo write?", "answer": "Tarrin Okonkwo wrote a book of poems.",
     "perturbed_answer": ["Tarrin Okonkwo wrote a novel.", "Tarrin Okonkwo wrote a story."]},
    {"question": "Where does Elspeth Brightwater live?", "answer": "She lives in Velloria, by the river.",
     "perturbed_answer": ["She lives in Rome.", "She lives in a village."]},
]
RETAIN = [
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris.",
     "perturbed_answer": ["The capital of France is Madrid.", "The capital of France is Rome."]},
    {"question": "What is the capital of Spain?", "answer": "The capital of Spain is Madrid.",
     "perturbed_answer": ["The capital of Spain is Paris.", "The capital of Spain is Rome."]},
    {"question": "Name three colors.", "answer": "Red, blue and green.",
     "perturbed_answer": ["Cat, dog and bird.", "One, two and three."]},
]
# --grad-accum 1: what --optimizer-in-backward needs, so every run takes the same steps.
TRAIN = ["--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--max-length", "64"]
EVAL = ["--mc-samples", "8", "--max-new-tokens", "8", "--steps", "8", "--block-length", "8"]


class Acceptance:
    """The checks run so far, written to one JSON after each."""

    def __init__(self, device: str, out: Path, work: Path):
        import torch

        self.device, self.out, self.work = device, out, work
        self.report = {"device": device, "torch": torch.__version__,
                       "accelerator": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checks": []}

    def mdu(self, name: str, *args: str, check=None, timeout: int = 600) -> dict:
        """Run one command; `check(result)` returns the problems it finds in the output."""
        return self._run(name, [sys.executable, "-m", "mdu_cli", *map(str, args)], "mdu " + " ".join(map(str, args)),
                         check, timeout)

    def script(self, name: str, path: str, *args: str, check=None, timeout: int = 600) -> dict:
        """Run one of benchmarks/'s scripts, as `mdu` above."""
        return self._run(name, [sys.executable, str(ROOT / path), *map(str, args)],
                         " ".join([path, *map(str, args)]), check, timeout)

    def _run(self, name: str, command: list[str], shown: str, check, timeout: int) -> dict:
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.work)
            rc, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as err:
            rc, stdout, stderr = None, err.stdout or "", f"timed out after {timeout} s"
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        result = {"name": name, "command": shown, "rc": rc,
                  "seconds": round(time.perf_counter() - started, 1), "stdout": stdout, "stderr": stderr}
        problems = [] if rc == 0 else [f"exit code {rc}"]
        if rc == 0 and check is not None:
            try:
                problems += check(result)
            except Exception as err:  # a check that cannot read the output is a failed check
                problems.append(f"output not as expected: {type(err).__name__}: {err}")
        return self._record(result, problems)

    def _record(self, result: dict, problems: list[str]) -> dict:
        entry = {key: result[key] for key in ("name", "command", "rc", "seconds")}
        entry.update(ok=not problems, problems=problems, stderr_tail=result.get("stderr", "")[-1500:])
        self.report["checks"].append(entry)
        self.report["passed"] = sum(c["ok"] for c in self.report["checks"])
        self.report["failed"] = sum(not c["ok"] for c in self.report["checks"])
        self.out.write_text(json.dumps(self.report, indent=2))
        print(f"{'ok  ' if entry['ok'] else 'FAIL'} {result['name']} ({result['seconds']} s)"
              + "".join(f"\n     {p}" for p in problems), flush=True)
        return result


def _write_records(path: Path, records: list[dict], perturbed: bool = False) -> Path:
    keep = ("question", "answer", "perturbed_answer") if perturbed else ("question", "answer")
    path.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in records), encoding="utf-8")
    return path


def _run_record(out: Path) -> dict:
    return json.loads((out / "mdu_run.json").read_text())


def _header_dtypes(path: Path) -> set[str]:
    import struct

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def trained_output(device: str, dtype: str | None = None, optimizer: dict | None = None):
    """The checks of an unlearn or finetune output: the layout, the run record's
    device (and dtype, optimizer), finite losses, weights that moved."""
    def check(result: dict) -> list[str]:
        summary = json.loads(result["stdout"])
        out = Path(summary["out_dir"])
        problems = [f"{name} missing" for name in ("config.json", "mdu_run.json", "train_log.jsonl",
                                                    "delta_report.json", "README.md")
                    if not (out / name).is_file()]
        weights = sorted(out.glob("*.safetensors"))
        if not weights:
            problems.append("no safetensors weights")
        record = _run_record(out)
        if record.get("device") != device:
            problems.append(f"the run record says device {record.get('device')!r}, not {device!r}")
        if f" on {device}" not in result["stderr"]:
            problems.append(f"the command did not say it runs on {device}")
        if dtype is not None and record.get("dtype") != dtype:
            problems.append(f"the run record says dtype {record.get('dtype')!r}, not {dtype!r}")
        if dtype == "bf16" and weights and "adapter" not in weights[0].name and _header_dtypes(weights[0]) != {"BF16"}:
            problems.append(f"bf16 weights expected, found {_header_dtypes(weights[0])}")
        for key, want in (optimizer or {}).items():
            if record.get("optimizer", {}).get(key) != want:
                problems.append(f"optimizer {key} is {record.get('optimizer', {}).get(key)!r}, not {want!r}")
        losses = [entry.get("forget_loss") for entry in map(json.loads, (out / "train_log.jsonl").open())]
        if not losses or not all(v is not None and math.isfinite(v) for v in losses):
            problems.append(f"non-finite or missing losses: {losses}")
        report = json.loads((out / "delta_report.json").read_text())
        if not report["total"]["rel_l2"] or not report["total"]["rel_l2"] > 0:
            problems.append("no weight moved (delta report total rel_l2 is 0)")
        return problems
    return check


def same_weights(reference: Path, device: str):
    """An output whose weights equal `reference`'s bit for bit (and which is a
    trained output in its own right)."""
    def check(result: dict) -> list[str]:
        from safetensors.torch import load_file

        problems = trained_output(device, "fp32")(result)
        out = Path(json.loads(result["stdout"])["out_dir"])
        mine, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
        differ = [k for k in theirs if k not in mine or not mine[k].equal(theirs[k])]
        return problems + ([f"{len(differ)} tensors differ from {reference.name}'s, {differ[0]} first"]
                           if differ else [])
    return check


def eval_cost_rows(path: Path):
    """eval_cost.py's figures: every configuration measured, finite, the new
    estimator at 128 samples no noisier than the old (its script asserts the
    generations identical)."""
    def check(result: dict) -> list[str]:
        figures = json.loads(path.read_text())
        problems = [f"{name}: {key} is {row.get(key)}" for name, row in figures.items()
                    for key in ("speedup", "mean_std", "forwards") if not math.isfinite(row.get(key, math.nan))]
        old, new = figures["old (independent, 128)"], figures["new (stratified, 128)"]
        if new["forwards"] > old["forwards"]:
            problems.append(f"the new path takes more forwards ({new['forwards']} against {old['forwards']})")
        return problems
    return check


def eval_report(result: dict) -> list[str]:
    report = json.loads(result["stdout"])
    problems = []
    for split in ("forget", "retain"):
        value = report["splits"][split]["probability"]
        if not 0 < value <= 1:
            problems.append(f"{split} probability {value} is not in (0, 1]")
        if report["splits"][split].get("rouge_l") is None:
            problems.append(f"{split} has no ROUGE-L (generation did not run)")
    if "base" not in report:
        problems.append("no base model in the report")
    return problems


def tofu_report(result: dict) -> list[str]:
    report = json.loads(result["stdout"])
    problems = []
    quality, utility = report.get("forget_quality"), report.get("model_utility")
    if quality is None or not 0 <= quality <= 1:
        problems.append(f"forget quality {quality} is not a p-value")
    if utility is None or not 0 <= utility <= 1:
        problems.append(f"model utility {utility} is not in [0, 1]")
    return problems


def push_plan(result: dict) -> list[str]:
    """A dry run's plan: the weights go up, no record file does."""
    plan = json.loads(result["stdout"])
    uploaded = {entry["path"] for entry in plan["upload"]}
    problems = [] if "model.safetensors" in uploaded else ["the plan uploads no weights"]
    leaked = sorted(p for p in uploaded if p.endswith((".jsonl", ".csv", ".parquet")) or p == "train_log.jsonl")
    return problems + ([f"the plan would upload data: {leaked}"] if leaked else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default="gpu_acceptance.json", help="the JSON of results")
    parser.add_argument("--work", help="keep the models and outputs here (default: a temporary directory)")
    parser.add_argument("--with-8b", action="store_true", help="also gpu_check.py's LLaDA-8B rows (about 3 minutes)")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="mdu-acceptance-") as scratch:
        work = Path(args.work).resolve() if args.work else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        return run_all(Acceptance(args.device, out, work), args.with_8b)


def run_all(run: Acceptance, with_8b: bool) -> int:
    import tiny_models

    device, work = run.device, run.work
    llada = tiny_models.build_llada(work / "tiny-llada")
    dream = tiny_models.build_dream(work / "tiny-dream")
    forget, retain = _write_records(work / "forget.jsonl", FORGET), _write_records(work / "retain.jsonl", RETAIN)
    tofu = {name: _write_records(work / f"{name}_perturbed.json", records, perturbed=True)
            for name, records in (("forget", FORGET), ("retain", RETAIN), ("real_authors", RETAIN),
                                  ("world_facts", RETAIN))}
    on = ["--device", device]

    run.mdu("unlearn llada full", "unlearn", "--model", llada, "--forget", forget, "--retain", retain,
            "--out", work / "llada-mdu", *TRAIN, *on, "--dtype", "fp32", "--json",
            check=trained_output(device, "fp32", {"name": "adamw"}))
    run.mdu("unlearn dream full", "unlearn", "--model", dream, "--forget", forget, "--retain", retain,
            "--out", work / "dream-mdu", *TRAIN, *on, "--json", check=trained_output(device))
    run.mdu("unlearn llada lora", "unlearn", "--model", llada, "--forget", forget, "--retain", retain,
            "--out", work / "llada-lora", *TRAIN, *on, "--lora", "--lora-r", "4", "--json",
            check=trained_output(device))
    run.mdu("unlearn dream bf16 default optimizer", "unlearn", "--model", dream, "--forget", forget, "--retain",
            retain, "--out", work / "dream-bf16", *TRAIN, *on, "--dtype", "bf16", "--json",
            check=trained_output(device, "bf16", {"name": "adamw-kahan", "kahan_sum": True,
                                                  "triton": device == "cuda"}))
    run.mdu("unlearn llada bf16 in backward, checkpointed, anchor offloaded", "unlearn", "--model", llada,
            "--forget", forget, "--retain", retain, "--out", work / "llada-in-backward", *TRAIN, *on, "--dtype",
            "bf16", "--optimizer-in-backward", "--gradient-checkpointing", "--anchor-offload", "--max-grad-norm", "0",
            "--json", check=trained_output(device, "bf16", {"name": "adamw-kahan", "in_backward": True}))
    # The streamed anchor (its passes a step ahead, on CUDA) against the anchor
    # in memory, three micro-batches a step: the same weights, bit for bit.
    accumulated = [*TRAIN, "--grad-accum", "3", "--dtype", "fp32", *on, "--json"]
    run.mdu("unlearn llada grad-accum 3, anchor in memory", "unlearn", "--model", llada, "--forget", forget,
            "--retain", retain, "--out", work / "llada-accum", *accumulated, check=trained_output(device, "fp32"))
    run.mdu("unlearn llada grad-accum 3, anchor streamed: the same weights", "unlearn", "--model", llada,
            "--forget", forget, "--retain", retain, "--out", work / "llada-accum-streamed", *accumulated,
            "--anchor-offload", check=same_weights(work / "llada-accum", device))
    run.mdu("finetune llada", "finetune", "--model", llada, "--data", retain, "--out", work / "llada-tuned",
            *TRAIN, *on, "--json", check=trained_output(device))

    run.mdu("eval llada against its base", "eval", work / "llada-mdu", "--base", llada, "--forget", forget,
            "--retain", retain, *EVAL, *on, "--json", check=eval_report)
    tofu_files = ["--forget", tofu["forget"], "--retain", tofu["retain"], "--real-authors", tofu["real_authors"],
                  "--world-facts", tofu["world_facts"]]
    reference = work / "reference-tofu.json"

    def save_reference(result: dict) -> list[str]:
        reference.write_text(result["stdout"], encoding="utf-8")
        report = json.loads(result["stdout"])
        return [] if len(report["splits"]["forget"]["truth_ratio_per_record"]) == len(FORGET) else \
            ["the reference report lacks per-record truth ratios"]

    run.mdu("eval tofu reference (the base)", "eval", llada, "--benchmark", "tofu", *tofu_files, *EVAL, *on,
            "--json", check=save_reference)
    run.mdu("eval tofu with the reference", "eval", work / "llada-mdu", "--benchmark", "tofu", *tofu_files,
            "--reference", reference, *EVAL, *on, "--json", check=tofu_report)

    def completion(result: dict) -> list[str]:
        return [] if result["stdout"].strip() else ["no completion printed"]

    run.mdu("generate dream", "generate", work / "dream-mdu", "--prompt", "Where was Astrid Halvorsen born?",
            "--max-new-tokens", "8", "--steps", "8", "--block-length", "8", *on, check=completion)

    def diff_report(result: dict) -> list[str]:
        report = json.loads((work / "diff.json").read_text())
        moved = report["total"]["rel_l2"]
        return [] if report["total"]["tensors"] > 0 and moved and moved > 0 else [f"diff found no change: {moved}"]

    run.mdu("diff base against unlearned", "diff", llada, work / "llada-mdu", "--json", work / "diff.json",
            check=diff_report)

    run.mdu("push --dry-run", "push", work / "llada-mdu", "--repo-id", "me/llada-forgot", "--dry-run", "--json",
            check=push_plan)

    cost = work / "eval_cost.json"
    run.script("eval cost, old against new", "benchmarks/eval_cost.py", "--device", device, "--records", "8",
               "--seeds", "2", "--rounds", "1", "--lower", "32", "--json", cost, check=eval_cost_rows(cost))
    gpu_check(run, with_8b)
    print(f"{run.report['passed']} passed, {run.report['failed']} failed", flush=True)
    return 0 if run.report["failed"] == 0 else 1


def gpu_check(run: Acceptance, with_8b: bool) -> None:
    """benchmarks/gpu_check.py's rows: the real loop on LLaDA-shaped models,
    with step time and peak memory (on the CPU its tiny shape)."""
    rows = run.work / "gpu_check.json"
    size = ["--tiny"] if run.device == "cpu" else ([] if with_8b else ["--skip-8b"])
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(rows), *size]
    started = time.perf_counter()
    # gpu_check.py takes the GPU whenever it sees one: hide it for a CPU run.
    # There it only checks the script, on torch's native kernels: its bf16
    # attention stops under a lowered ATEN_CPU_CAPABILITY on AVX-512-BF16 CPUs.
    env = dict(os.environ) if run.device == "cuda" else dict(os.environ, CUDA_VISIBLE_DEVICES="")
    if run.device == "cpu":
        env.pop("ATEN_CPU_CAPABILITY", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=run.work, env=env)
    result = {"name": "gpu_check.py rows", "command": " ".join(command[1:]), "rc": done.returncode,
              "seconds": round(time.perf_counter() - started, 1), "stderr": done.stderr}
    problems = [] if done.returncode == 0 else [f"exit code {done.returncode}"]
    if rows.is_file():
        report = json.loads(rows.read_text())
        run.report["gpu_check"] = report
        for row in report["runs"]:
            if "error" in row:
                problems.append(f"{row['model']} {row['mode']}: {row['error']}")
            elif not all(v is not None and math.isfinite(v) for v in row["forget_loss"].values()):
                problems.append(f"{row['model']} {row['mode']}: non-finite forget loss {row['forget_loss']}")
    elif done.returncode == 0:
        problems.append("gpu_check.py wrote no results")
    run._record(result, problems)


if __name__ == "__main__":
    sys.exit(main())
