"""TOFU's protocol end to end, offline, on a CPU in a few minutes.

    python examples/tofu/run.py [WORK_DIR]

The demo model (examples/demo/model) is the pretrained base and
examples/tofu/data/ a TOFU-format set of twenty new authors (make_data.py). The
steps are the ones a GPU run takes on locuslab/TOFU, by the `mdu` commands:

 1. mdu finetune   base on every author            -> target   (TOFU's "full" model)
 2. mdu finetune   base on the retained authors    -> reference (never saw the forget set)
 3. mdu eval --benchmark tofu  on the reference    -> reference.json
 4. mdu unlearn    the target, MDU at two tau, and the GA and NPO baselines
 5. mdu eval --benchmark tofu --reference reference.json  on every model

and it prints forget quality and model utility for each. Every command is
echoed as it runs; WORK_DIR (default: a fresh temporary directory) keeps the
models and reports. The commands run in this one process, as
`cli.main(args)`: the same code as typing them, without paying the imports
each time.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
BASE = HERE.parent / "demo" / "model"
# The same budget for both fine-tunings, as TOFU trains target and reference alike.
FINETUNE = ["--epochs", "40", "--batch-size", "10", "--grad-accum", "1", "--lr", "2e-3", "--warmup-ratio", "0.05",
            "--max-length", "64", "--seed", "0"]
UNLEARN = ["--retain", str(DATA / "retain.json"), "--epochs", "8", "--batch-size", "5", "--grad-accum", "1",
           "--lr", "1e-3", "--alpha", "1", "--max-length", "64", "--seed", "0"]
METHODS = [("MDU, tau = 1", ["--method", "mdu", "--tau", "1"]), ("MDU, tau = 0", ["--method", "mdu", "--tau", "0"]),
           ("GA", ["--method", "ga"]), ("NPO", ["--method", "npo"])]
EVAL = ["--benchmark", "tofu", "--forget", str(DATA / "forget_perturbed.json"),
        "--retain", str(DATA / "retain_perturbed.json"), "--real-authors", str(DATA / "real_authors_perturbed.json"),
        "--world-facts", str(DATA / "world_facts_perturbed.json"), "--mc-samples", "32", "--max-new-tokens", "16",
        "--steps", "16", "--block-length", "16", "--device", "cpu", "--json"]


def mdu(*args: str) -> str:
    """Run one `mdu` command, in this process (the imports are paid once), and
    return what it printed."""
    from mdu_cli.cli import cli

    print("$ mdu " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(args=list(args), prog_name="mdu", standalone_mode=False)
    return printed.getvalue()


def evaluate(model: Path, report: Path, reference: Path | None = None) -> dict:
    report.write_text(mdu("eval", str(model), *EVAL, *(["--reference", str(reference)] if reference else [])),
                      encoding="utf-8")
    return json.loads(report.read_text(encoding="utf-8"))


def main(work: Path, methods: int = len(METHODS)) -> list[tuple[str, dict]]:
    started = time.perf_counter()
    target, reference = work / "target", work / "reference"
    mdu("finetune", "--model", str(BASE), "--data", str(DATA / "full.json"), "--out", str(target), *FINETUNE,
        "--json")
    mdu("finetune", "--model", str(BASE), "--data", str(DATA / "retain.json"), "--out", str(reference), *FINETUNE,
        "--json")
    reference_report = work / "reference.json"
    rows = [("reference (retain only)", evaluate(reference, reference_report)),
            ("target, before unlearning", evaluate(target, work / "target.json", reference_report))]
    for name, options in METHODS[:methods]:
        out = work / name.replace(" ", "").replace(",", "-").replace("=", "")
        mdu("unlearn", "--model", str(target), "--forget", str(DATA / "forget_perturbed.json"), *UNLEARN, *options,
            "--out", str(out), "--json")
        rows.append((name, evaluate(out, out / "eval-tofu.json", reference_report)))
    print("| model | forget quality | model utility | forget prob. | forget truth ratio (closer to 1) |")
    print("|---|---|---|---|---|")
    for name, report in rows:
        forget = report["splits"]["forget"]
        fq = "(reference)" if report["forget_quality"] is None else f"{report['forget_quality']:.3g}"
        print(f"| {name} | {fq} | {report['model_utility']:.3f} | "
              f"{forget['probability']:.3f} | {forget['truth_ratio_closer_to_1']:.3f} |")
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
