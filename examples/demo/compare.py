"""Compare MDU (tau 0, 1, 2) with the GA and NPO baselines on the demo, at one
training budget, and print the table of docs/unlearn.md.

    python examples/demo/compare.py

Every run uses examples/demo/run.yaml (20 epochs, lr 1e-3, alpha 8, seed 42)
with only the method and tau changed, then `mdu eval` with 128 Monte Carlo
samples and greedy 16-token generations (16 steps, one block).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [("MDU, tau = 0", {"method": "mdu", "tau": 0.0}), ("MDU, tau = 1", {"method": "mdu", "tau": 1.0}),
        ("MDU, tau = 2", {"method": "mdu", "tau": 2.0}), ("GA", {"method": "ga"}), ("NPO", {"method": "npo"})]
GENERATION = {"max_new_tokens": 16, "steps": 16, "block_length": 16}


def main() -> None:
    from mdu_cli.config.training import build_config
    from mdu_cli.config.yaml_file import read_yaml
    from mdu_cli.evaluation.report import run_eval
    from mdu_cli.train.run import run_unlearn

    forget, retain = str(HERE / "forget.jsonl"), str(HERE / "retain.jsonl")

    def measure(model: str) -> dict:
        return run_eval(model, forget, retain, mc_samples=128, generation=GENERATION, show_progress=False,
                        write=False)["splits"]

    rows = [("base (before unlearning)", measure(str(HERE / "model")))]
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in RUNS:
            options = {**read_yaml(HERE / "run.yaml"), **change, "out": str(Path(tmp) / name.replace(" ", ""))}
            out = run_unlearn(build_config({}, options), show_progress=False).out_dir
            rows.append((name, measure(str(out))))
            print(f"done: {name}", file=sys.stderr, flush=True)
    print("| model | forget prob. | forget ROUGE-L | retain prob. | retain ROUGE-L |")
    print("|---|---|---|---|---|")
    for name, splits in rows:
        f, r = splits["forget"], splits["retain"]
        print(f"| {name} | {f['probability']:.3f} | {f['rouge_l']:.3f} | {r['probability']:.3f} | {r['rouge_l']:.3f} |")


if __name__ == "__main__":
    main()
