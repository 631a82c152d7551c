"""What a TOFU-style evaluation costs, before and after the changes of the
issue "Fast where users wait", side by side in one run on the same model.

    python benchmarks/eval_cost.py [--records 40] [--seeds 8] [--rounds 3] [--lower 64 32] [--device cpu]
                                   [--json FILE]

The model is the demo model (examples/demo/model, a native masked-LM that ends
its answers with a stop token) and the records TOFU's format
(examples/tofu/data/forget_perturbed.json: a gold answer and three perturbed
ones each). Per record, TOFU's work: the likelihood of every answer by the
Monte Carlo estimator, and a greedy generation for ROUGE (32 new tokens in
blocks of 8, one token per step).

- **old**: the former estimator (independent mask counts and subsets) at 128
  samples, one answer's samples at a time, and generation through the whole
  schedule (`early_exit=False`).
- **new**: the stratified estimator with its samples of all of a record's
  answers packed into shared forwards, at 128 samples and at the lower counts
  it is measured at, and generation that stops when it is done.

Printed: forwards, rows and tokens per record (every model call counted),
wall time per record (the best of --rounds, old and new alternating), and the
per-record standard deviation of the gold answer's score over --seeds seeds
(the mean over records, and how many records are noisier than under the old
estimator at 128), and the same for the per-token bound of longer texts (the
RWKU example's MIA texts), where the estimator's advantage is smaller. Wall
time is the CPU's; the forwards and tokens carry over to a GPU, where a
forward's cost grows with its tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "examples" / "demo" / "model"
RECORDS = ROOT / "examples" / "tofu" / "data" / "forget_perturbed.json"
MIA = ROOT / "examples" / "rwku" / "data" / "All"
GENERATION = {"max_new_tokens": 32, "steps": 32, "block_length": 8, "ordering": "confidence"}


class Counting(torch.nn.Module):
    """The model, counting its forwards, the rows and the tokens they carry."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.forwards = self.rows = self.tokens = 0

    def forward(self, input_ids, attention_mask=None):
        self.forwards += 1
        self.rows += input_ids.shape[0]
        self.tokens += input_ids.numel()
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def likelihoods(loaded, records, samples: int, seed: int, estimator: str, packed: bool) -> list[float]:
    """Every answer's score, record by record (the gold answer's first)."""
    from mdu_cli.evaluation.likelihood import answer_score_many

    generator = torch.Generator().manual_seed(seed)
    gold = []
    for record in records:
        prompt = loaded.prompt_ids(record.prompt_messages, where=record.source)
        answers = [record.response, *record.perturbed]
        if packed:
            scores = answer_score_many(loaded, prompt, answers, samples, generator, 32, estimator)
        else:  # as before: one answer, and its own forwards, at a time
            scores = [answer_score_many(loaded, prompt, [a], samples, generator, 32, estimator)[0] for a in answers]
        gold.append(scores[0])
    return gold


def generations(loaded, records, early_exit: bool) -> list[list[int]]:
    from mdu_cli.model.sampling import generate

    outputs = []
    for first in range(0, len(records), 32):
        chunk = records[first:first + 32]
        prompts = [loaded.prompt_ids(r.prompt_messages, where=r.source) for r in chunk]
        outputs += generate(loaded.model, loaded.family, loaded.mask_token_id, prompts, pad_id=loaded.pad_id,
                            stop_ids=loaded.stop_ids(), early_exit=early_exit, **GENERATION)
    return outputs


def run(loaded, records, samples: int, estimator: str, new: bool) -> dict:
    """One pass of the TOFU-style work: counts, time and outputs."""
    counter = Counting(loaded.model)
    model, loaded.model = loaded.model, counter
    try:
        started = time.perf_counter()
        likelihoods(loaded, records, samples, 0, estimator, packed=new)
        middle = time.perf_counter()
        outputs = generations(loaded, records, early_exit=new)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        ended = time.perf_counter()
    finally:
        loaded.model = model
    n = len(records)
    return {"forwards": counter.forwards / n, "rows": counter.rows / n, "tokens": counter.tokens / n,
            "likelihood_s": (middle - started) / n, "generation_s": (ended - middle) / n,
            "total_s": (ended - started) / n, "outputs": outputs}


def spread(loaded, records, samples: int, estimator: str, seeds: int) -> list[float]:
    """Per record, the standard deviation of the gold answer's score over seeds."""
    per_seed = [likelihoods(loaded, records, samples, seed, estimator, packed=True) for seed in range(seeds)]
    return [statistics.stdev(values) for values in zip(*per_seed)]


def text_spread(loaded, texts: list[list[int]], samples: int, estimator: str, seeds: int) -> list[float]:
    """Per text, the standard deviation over seeds of the per-token bound
    (RWKU's MIA LOSS: the same estimator on a text after the BOS)."""
    from mdu_cli.evaluation.likelihood import answer_scores, mc_masks

    prefix = [loaded.tokenizer.bos_token_id] if loaded.tokenizer.bos_token_id is not None else []
    return [statistics.stdev(statistics.mean(answer_scores(loaded, prefix, ids, mc_masks(
        len(ids), samples, torch.Generator().manual_seed(seed), estimator))) for seed in range(seeds))
        for ids in texts]


# The projection for TOFU forget10 on LLaDA-8B (--project): TOFU's split sizes,
# 7 answers a record (gold, paraphrase, 5 perturbed), LLaDA tokens per prompt
# (chat template included) and answer, the paper preset's 256 new tokens in
# blocks of 128, 32 rows a forward, 2 x 8.0e9 FLOPs a token at an assumed 40%
# of the H200's 989 dense bf16 TFLOP/s. An estimate, not a measurement.
TOFU_FORGET10 = {"forget": 400, "retain": 400, "real_authors": 100, "world_facts": 117}
ANSWERS, PROMPT_TOKENS, ANSWER_TOKENS, NEW_TOKENS, ROWS = 7, 60, 30, 256, 32
PARAMETERS, H200_BF16, MFU = 8.0e9, 989e12, 0.40
# Early exit on LLaDA's preset: an answer shorter than 128 tokens is final by
# the end of the first block, so the second block (half the steps) never runs;
# rows that finish inside the first block save more, not counted here.
EARLY_EXIT_SHARE = 0.5


def projection(samples: int, early_exit: bool) -> dict:
    """Forwards, tokens and minutes of one TOFU forget10 evaluation."""
    records = sum(TOFU_FORGET10.values())
    passes = sum(math.ceil(n / ROWS) for n in TOFU_FORGET10.values())
    likelihood_forwards = records * math.ceil(ANSWERS * samples / ROWS)
    likelihood_tokens = records * ANSWERS * samples * (PROMPT_TOKENS + ANSWER_TOKENS)
    share = EARLY_EXIT_SHARE if early_exit else 1.0
    generation_forwards = passes * NEW_TOKENS * share
    generation_tokens = records * NEW_TOKENS * share * (PROMPT_TOKENS + NEW_TOKENS)
    seconds = 2 * PARAMETERS * (likelihood_tokens + generation_tokens) / (MFU * H200_BF16)
    return {"likelihood_forwards": likelihood_forwards, "generation_forwards": int(generation_forwards),
            "tokens": likelihood_tokens + generation_tokens, "minutes": seconds / 60}


def print_projection() -> None:
    print("TOFU forget10 (1,017 records) on LLaDA-8B, H200, projected (40% MFU assumed):")
    print("| pipeline | likelihood forwards | generation forwards | tokens | minutes |")
    print("|---|---|---|---|---|")
    for name, samples, early in (("old, 128 samples", 128, False), ("new, 128 samples", 128, True),
                                 ("new, --mc-samples 64", 64, True), ("new, --mc-samples 32", 32, True)):
        row = projection(samples, early)
        print(f"| {name} | {row['likelihood_forwards']:,} | {row['generation_forwards']:,} | "
              f"{row['tokens'] / 1e6:.0f}M | {row['minutes']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lower", type=int, nargs="+", default=[64, 32],
                        help="the lower sample counts to measure the new estimator at")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--device", default="cpu", help="cpu (the goal's figures) or cuda")
    parser.add_argument("--project", action="store_true", help="only print the TOFU forget10 projection for 8B")
    args = parser.parse_args()
    if args.project:
        print_projection()
        return
    from mdu_cli.data.records import load_dataset
    from mdu_cli.model.inference import load_for_inference

    torch.manual_seed(0)
    loaded = load_for_inference(str(MODEL), device=args.device)
    records = load_dataset(RECORDS).records[:args.records]
    configs = {"old (independent, 128)": (128, "independent", False),
               **{f"new (stratified, {n})": (n, "stratified", True) for n in sorted({128, *args.lower},
                                                                                       reverse=True)}}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, (samples, estimator, new) in configs.items():
            row = run(loaded, records, samples, estimator, new)
            if name not in best or row["total_s"] < best[name]["total_s"]:
                best[name] = row
    old = best["old (independent, 128)"]
    assert all(row["outputs"] == old["outputs"] for row in best.values()), "early exit changed a generation"
    spreads = {name: spread(loaded, records, samples, estimator, args.seeds)
               for name, (samples, estimator, _) in configs.items()}
    old_spread = spreads["old (independent, 128)"]
    from mdu_cli.data.tokenization import encode_text

    texts = [encode_text(loaded.tokenizer, row["text"]) for name in ("forget_mia", "retain_mia")
             for row in json.loads((MIA / f"{name}.json").read_text())]
    text_spreads = {name: text_spread(loaded, texts, samples, estimator, args.seeds)
                    for name, (samples, estimator, _) in configs.items()}
    where = f"CPU ({torch.get_num_threads()} threads)" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{len(records)} TOFU-format records, {loaded.source.name}, {where}; "
          f"generation {GENERATION}; best of {args.rounds} rounds; std over {args.seeds} seeds")
    print("| estimator (samples) | forwards / record | tokens / record | likelihood ms | generation ms | "
          "total ms | speed-up | mean per-record std | records noisier than old |")
    print("|---|---|---|---|---|---|---|---|---|")
    figures = {}
    for name, row in best.items():
        noisier = sum(a > b for a, b in zip(spreads[name], old_spread))
        figures[name] = {k: v for k, v in row.items() if k != "outputs"}
        figures[name].update(speedup=old["total_s"] / row["total_s"], mean_std=statistics.mean(spreads[name]),
                             noisier=noisier)
        print(f"| {name} | {row['forwards']:.1f} | {row['tokens']:.0f} | {1e3 * row['likelihood_s']:.1f} | "
              f"{1e3 * row['generation_s']:.1f} | {1e3 * row['total_s']:.1f} | "
              f"{old['total_s'] / row['total_s']:.2f}x | {statistics.mean(spreads[name]):.4f} | "
              f"{noisier} of {len(records)} |")
    print(f"generations identical old and new: yes ({sum(len(o) for o in old['outputs'])} tokens kept in all)")
    lengths = sorted(len(t) for t in texts)
    print(f"\nLonger texts: the {len(texts)} RWKU MIA texts of examples/rwku ({lengths[0]}-{lengths[-1]} tokens), "
          "the per-token bound (MIA's LOSS), std over the same seeds")
    print("| estimator (samples) | mean per-text std | texts noisier than old |")
    print("|---|---|---|")
    old_text = text_spreads["old (independent, 128)"]
    for name, values in text_spreads.items():
        noisier = sum(a > b for a, b in zip(values, old_text))
        figures[name].update(text_mean_std=statistics.mean(values), text_noisier=noisier)
        print(f"| {name} | {statistics.mean(values):.4f} | {noisier} of {len(texts)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
