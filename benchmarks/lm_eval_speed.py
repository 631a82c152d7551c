"""Requests per second of the `mdu` lm-eval model, pooled across requests,
against the same estimator one request at a time, side by side in one run.

    python benchmarks/lm_eval_speed.py [--batch-size 16] [--mc-samples 128]

On the tests' tiny Dream-shaped model (CPU), three request sets of the kinds
lm-eval tasks send:

- single-token choices (MMLU-style letters, ARC-style one-word answers):
  64 questions x 4 choices, each exact in one masked position;
- multi-token choices (TruthfulQA-style): 16 questions x 4 answers of 2-5
  tokens, the Monte Carlo bound with --mc-samples masks each;
- generate_until (TriviaQA/GSM8K-style): 32 prompts, 16 new tokens.

"One at a time" is what the wrappers that call a model per request do: each
request alone (its own Monte Carlo rows still batched, --batch-size per
forward; one prompt per generation). The adapter pools every request's rows,
sorted by length, --batch-size per forward, and generates --batch-size
prompts together. Both give the same numbers (tests/test_lm_eval.py); the
best of three rounds of each is reported.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


class Request:
    def __init__(self, *args):
        self.args = args


def request_sets(vocab: int, seed: int = 0) -> dict:
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(10, vocab) for _ in range(n)]

    single = [(None, tokens(rng.randint(20, 60)), [letter]) for _ in range(64) for letter in (11, 12, 13, 14)]
    multi = []
    for _ in range(16):
        context = tokens(rng.randint(30, 60))
        multi += [(None, context, tokens(rng.randint(2, 5))) for _ in range(4)]
    generation = [Request(" ".join(["cat"] * rng.randint(10, 40)), {"until": ["\n\n"], "max_gen_toks": 16})
                  for _ in range(32)]
    return {"single-token choices": single, "multi-token choices": multi, "generate_until": generation}


def timed(function, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mc-samples", type=int, default=128)
    args = parser.parse_args()

    import torch
    from tiny_models import build_dream

    from mdu_cli.evaluation.harness.model import MduLM
    from mdu_cli.model.inference import load_for_inference

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_for_inference(str(build_dream(Path(tmp) / "dream")), trust_remote_code=True, device="cpu")
    pooled = MduLM(loaded=loaded, mc_samples=args.mc_samples, batch_size=args.batch_size, show_progress=False)
    alone = MduLM(loaded=loaded, mc_samples=args.mc_samples, batch_size=args.batch_size, show_progress=False)
    single_prompt = MduLM(loaded=loaded, mc_samples=args.mc_samples, batch_size=1, show_progress=False)
    sets = request_sets(len(loaded.tokenizer))
    print(f"tiny Dream-shaped model, CPU, batch {args.batch_size}, {args.mc_samples} Monte Carlo samples; "
          "best of 3 rounds")
    print(f"{'requests':22} {'n':>4} {'one at a time':>14} {'pooled':>9} {'ratio':>6}")
    for name, requests in sets.items():
        if name == "generate_until":
            slow = timed(lambda: [single_prompt.generate_until([r]) for r in requests])
            fast = timed(lambda: pooled.generate_until(requests))
        else:
            slow = timed(lambda: [alone._loglikelihood_tokens([r]) for r in requests])
            fast = timed(lambda: pooled._loglikelihood_tokens(requests))
        n = len(requests)
        print(f"{name:22} {n:4d} {n / slow:11.1f}/s {n / fast:7.1f}/s {slow / fast:5.1f}x")


if __name__ == "__main__":
    main()
