"""What one RWKU target costs: forwards per part, counted and by formula, and
the projected H200 time for Dream-7B.

    python benchmarks/rwku_cost.py [--mc-samples 128] [--batch-size 32]

1. Counted: `mdu eval --benchmark rwku` on the tests' tiny Dream-shaped model
   and the example's RWKU copy (examples/rwku/data), RWKU's own lengths, one
   part at a time, every model forward counted (calls and tokens, batch x
   sequence). Printed beside the formula of `forwards()`, which must agree.
2. Projected: the same formula on a Dream-7B target of RWKU's average size
   (the row counts below: RWKU's 13,131 forget probes over 200 targets, the
   other sets estimated from the per-target files' sizes on the Hub, about
   200-1000 bytes a row) with Dream's token lengths estimated per set, at
   2 x 7.6e9 FLOPs per token and an assumed 40% of the H200's 989 bf16
   TFLOP/s. An estimate, not a measurement: say so wherever it is quoted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT / "examples" / "rwku" / "data"
TARGET = "elspeth moraine"

# Per-target rows of an average RWKU target, and Dream tokens per prompt (and per MIA text / TruthfulQA choice).
AVERAGE_TARGET = {
    "forget": (66, 60), "neighbor": (75, 60), "forget_mia": (20, 250), "retain_mia": (30, 250),
    "general": (30, 700), "reasoning": (20, 900), "truthfulness": (20, 250), "truthfulness_choices": 8,
    "factuality": (20, 150), "fluency": (30, 60),
}
TOKENS = {"forget": 30, "neighbor": 30, "reasoning": 256, "factuality": 30, "fluency": 256}
DREAM_PARAMETERS, H200_BF16, MFU = 7.6e9, 989e12, 0.40


def forwards(rows: dict, mc_samples: int, batch: int) -> dict[str, int]:
    """Forwards per part: a generation takes one forward per step (one token
    per step) for every pass of `batch` rows; an MIA text its Monte Carlo
    masks plus at most one covering mask, `batch` per forward; MMLU one
    forward per `batch` rows; TruthfulQA `mc_samples` masks per distinct
    choice."""
    passes = lambda n: math.ceil(n / batch)  # noqa: E731
    mia = lambda n, covering: n * passes(mc_samples + covering)  # noqa: E731 (covering: 0 or 1 extra mask)
    return {
        "forget": passes(rows["forget"]) * TOKENS["forget"],
        "neighbor": passes(rows["neighbor"]) * TOKENS["neighbor"],
        "mia": mia(rows["forget_mia"], rows.get("covering", 0)) + mia(rows["retain_mia"], rows.get("covering", 0)),
        # MMLU rows are scored in groups of the same number of choices.
        "utility": (rows.get("general_passes", passes(rows["general"]))
                    + passes(rows["reasoning"]) * TOKENS["reasoning"]
                    + rows["truthfulness_choices_total"] * passes(mc_samples)
                    + passes(rows["factuality"]) * TOKENS["factuality"] + passes(rows["fluency"]) * TOKENS["fluency"]),
    }


def counted(mc_samples: int, batch: int) -> tuple[dict, dict, float]:
    """Forwards and tokens per part on the tiny model, and the wall time."""
    from click.testing import CliRunner
    from tiny_models import build_dream

    from mdu_cli.cli import cli
    from mdu_cli.evaluation import likelihood
    from mdu_cli.model import sampling

    calls = {"forwards": 0, "tokens": 0}
    for module in (likelihood, sampling):
        original = module.model_logits

        def counting(model, input_ids, attention_mask, family, _original=original):
            calls["forwards"] += 1
            calls["tokens"] += input_ids.numel()
            return _original(model, input_ids, attention_mask, family)

        module.model_logits = counting
    per_part, tokens = {}, {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_dream(Path(tmp) / "dream")
        for part in ("forget", "neighbor", "mia", "utility"):
            calls.update(forwards=0, tokens=0)
            result = CliRunner().invoke(cli, ["eval", str(model), "--benchmark", "rwku", "--target", TARGET,
                                              "--rwku", str(DATA), "--part", part, "--mc-samples", str(mc_samples),
                                              "--batch-size", str(batch), "--device", "cpu",
                                              "--trust-remote-code", "--json"])
            if result.exit_code != 0:
                raise SystemExit(result.output)
            per_part[part], tokens[part] = calls["forwards"], calls["tokens"]
    return per_part, tokens, time.perf_counter() - started


def example_rows(batch: int) -> dict:
    """The example target's row counts, as the formula takes them."""
    def rows(name):
        return [r for r in json.loads((DATA / "All" / name).read_text()) if r.get("subject") == TARGET]

    truthful, general = rows("truthful.json"), rows("retain_mmlu.json")
    counts = [len(r["choices"]) for r in general]
    return {
        "general_passes": sum(math.ceil(counts.count(c) / batch) for c in set(counts)),
        "forget": sum(len(rows(f"forget_level{n}.json")) for n in (1, 2, 3)),
        "neighbor": sum(len(rows(f"neighbor_level{n}.json")) for n in (1, 2)),
        "forget_mia": len(rows("forget_mia.json")), "retain_mia": len(rows("retain_mia.json")),
        "general": len(rows("retain_mmlu.json")), "reasoning": len(rows("retain_bbh.json")),
        "truthfulness_choices_total": sum(len(set(r["mc1_targets"]["choices"] + r["mc2_targets"]["choices"]))
                                          for r in truthful),
        "factuality": len(rows("triviaqa.json")), "fluency": len(rows("fluency.json")),
    }


def projected(mc_samples: int, batch: int) -> tuple[dict, dict]:
    """Forwards and seconds per part for an average Dream-7B target."""
    rows = {k: (v[0] if isinstance(v, tuple) else v) for k, v in AVERAGE_TARGET.items()}
    rows["truthfulness_choices_total"] = rows["truthfulness"] * AVERAGE_TARGET["truthfulness_choices"]
    count = forwards(rows, mc_samples, batch)

    def seconds(tokens_per_forward_row: float, forwards_: int, rows_per_forward: float) -> float:
        return forwards_ * rows_per_forward * tokens_per_forward_row * 2 * DREAM_PARAMETERS / (H200_BF16 * MFU)

    def gen(part):
        n, prompt = AVERAGE_TARGET[part]
        return seconds(prompt + TOKENS[part], math.ceil(n / batch) * TOKENS[part], min(n, batch))

    mia_rows = min(batch, mc_samples)
    mia = sum(seconds(AVERAGE_TARGET[s][1], AVERAGE_TARGET[s][0] * math.ceil(mc_samples / batch), mia_rows)
              for s in ("forget_mia", "retain_mia"))
    truthful_forwards = rows["truthfulness_choices_total"] * math.ceil(mc_samples / batch)
    utility = (seconds(AVERAGE_TARGET["general"][1] + 1, math.ceil(rows["general"] / batch),
                       min(rows["general"], batch))
               + gen("reasoning") + gen("factuality") + gen("fluency")
               + seconds(AVERAGE_TARGET["truthfulness"][1] + 12, truthful_forwards, min(batch, mc_samples)))
    time_ = {"forget": gen("forget"), "neighbor": gen("neighbor"), "mia": mia, "utility": utility}
    return count, time_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mc-samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    per_part, tokens, wall = counted(args.mc_samples, args.batch_size)
    # At 128 samples a token is masked by none with probability about 2^-128: no covering mask.
    formula = forwards({**example_rows(args.batch_size), "covering": 0}, args.mc_samples, args.batch_size)
    print(f"counted on the example target (tiny Dream, mc {args.mc_samples}, batch {args.batch_size}; "
          f"{wall:.1f} s on this CPU):")
    print(f"{'part':10} {'forwards':>9} {'formula':>8} {'tokens':>9}")
    for part in per_part:
        print(f"{part:10} {per_part[part]:9d} {formula[part]:8d} {tokens[part]:9d}")
    print(f"{'total':10} {sum(per_part.values()):9d} {sum(formula.values()):8d} {sum(tokens.values()):9d}")
    count, seconds = projected(args.mc_samples, args.batch_size)
    print(f"\nprojected, Dream-7B on one H200 (estimate: an average RWKU target, {MFU:.0%} of "
          f"{H200_BF16 / 1e12:.0f} TFLOP/s):")
    print(f"{'part':10} {'forwards':>9} {'seconds':>8}")
    for part in count:
        print(f"{part:10} {count[part]:9d} {seconds[part]:8.0f}")
    print(f"{'total':10} {sum(count.values()):9d} {sum(seconds.values()):8.0f}  "
          f"(= {sum(seconds.values()) / 60:.1f} min per target and model)")


if __name__ == "__main__":
    main()
