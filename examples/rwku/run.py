"""RWKU's protocol end to end, offline, on a CPU in under a minute.

    python examples/rwku/run.py [WORK_DIR]

The demo model (examples/demo/model) is the off-the-shelf model and
examples/rwku/data/ an RWKU-format copy about one of the authors it knows,
"elspeth moraine" (make_data.py). The steps are the ones a GPU run takes on
jinzhuoran/RWKU, by the `mdu` commands:

 1. mdu corpus    the model writes its own forget corpus about the target
 2. mdu unlearn   MDU, forget-only (--alpha 0), at each tau, from the original model
 3. mdu eval --benchmark rwku --base ORIGINAL   on every unlearned model
 4. aggregate.py  one table: the original, then each tau

The evaluation is RWKU's forget, neighbor and MIA parts; the utility part's
few-shot primers (TruthfulQA's alone is about 200 tokens) do not fit the
demo model's 64 positions, so it runs in the tests on longer tiny models.
The generations are shortened to 12 tokens for the same reason, and the
probes put the raw query in the user turn (--preset paper), the format the
demo model was trained on. Every command is echoed; WORK_DIR (default: a
fresh temporary directory) keeps the models and reports.
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
TARGET = "elspeth moraine"
TAUS = ("1", "4")
CORPUS = ["--samples", "32", "--max-new-tokens", "24", "--seed", "0", "--device", "cpu"]
UNLEARN = ["--method", "mdu", "--alpha", "0", "--epochs", "5", "--batch-size", "8", "--grad-accum", "1",
           "--lr", "1e-3", "--max-length", "64", "--seed", "0"]
EVAL = ["--benchmark", "rwku", "--target", TARGET, "--rwku", str(DATA), "--part", "forget", "--part", "neighbor",
        "--part", "mia", "--preset", "paper", "--max-new-tokens", "12", "--mc-samples", "16", "--device", "cpu",
        "--json"]


def mdu(*args: str) -> str:
    """Run one `mdu` command in this process and return what it printed."""
    from mdu_cli.cli import cli

    print("$ mdu " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(args=list(args), prog_name="mdu", standalone_mode=False)
    return printed.getvalue()


def main(work: Path, taus: tuple[str, ...] = TAUS) -> list[dict]:
    sys.path.insert(0, str(HERE))
    import aggregate

    started = time.perf_counter()
    corpus = work / "corpus.jsonl"
    mdu("corpus", "--model", str(BASE), "--target", TARGET, "--rwku", str(DATA), "--out", str(corpus), *CORPUS,
        "--json")
    reports = []
    for tau in taus:
        out = work / f"mdu-tau{tau}"
        mdu("unlearn", "--model", str(BASE), "--forget", str(corpus), "--tau", tau, *UNLEARN, "--out", str(out),
            "--json")
        reports.append(json.loads(mdu("eval", str(out), "--base", str(BASE), *EVAL)))
    print(aggregate.markdown(aggregate.aggregate(reports)))
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return reports


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
