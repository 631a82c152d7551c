"""The answer-probability estimator of a masked diffusion LM (docs/method.md
section 4): for each of n samples draw l ~ U{1..L} (L = answer length; the n
counts stratified over an even grid by default), mask l answer tokens chosen
uniformly without replacement, and score the mean cross-entropy at the masked
positions; probability = exp(-mean score).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mdu_cli.data.tokenization import encode_text
from mdu_cli.model.families import model_logits
from mdu_cli.model.inference import LoadedModel

ESTIMATORS = ("stratified", "independent")
# The estimator every command uses; eval reports record it, and a TOFU
# reference scored by another one is refused (its masks differ).
ESTIMATOR = "stratified"


def mask_counts(length: int, samples: int, generator: torch.Generator) -> list[int]:
    """How many answer tokens each sample masks, stratified: the samples'
    masking rates lie on an even grid with one random offset, t_j = (j + u) / n,
    and sample j masks floor(t_j * L) + 1 tokens. Each t_j is uniform over its
    stratum, so a sample picked at random has t ~ U[0, 1) and a count
    ~ U{1..L}, as an independent draw has (the estimate stays unbiased), while
    the n counts cover the range evenly instead of clustering by chance."""
    offset = torch.rand((), generator=generator, dtype=torch.float64)
    rates = (torch.arange(samples, dtype=torch.float64) + offset) / samples
    return (rates * length).floor().long().clamp_(max=length - 1).add_(1).tolist()


def draw_masks(length: int, samples: int, generator: torch.Generator, estimator: str = ESTIMATOR) -> torch.Tensor:
    """(samples, length) booleans, True where a sample hides an answer token.

    "stratified" (the default): the counts of `mask_counts`, and the samples'
    windows laid end to end along the positions in random order: sample 0
    hides the first l_0 positions of a random permutation, sample 1 the next
    l_1, and so on; each pass over all L positions (a lap) takes a fresh
    permutation, and a window that runs past a lap's end wraps around to its
    start. Within a lap the windows all but partition the positions, so every
    position is hidden about equally often instead of by chance, which lowers
    the variance again (benchmarks/eval_cost.py measures it); each window
    alone is a uniformly random l-subset, since its lap's permutation is
    uniform and independent of the counts, so the estimate stays unbiased.
    Drawn on the CPU for all samples at once: no per-row work reaches the
    device.

    "independent": the former draw, exactly: per sample l ~ U{1..L}, then the
    first l positions of its own random permutation."""
    if estimator == "independent":
        masks = torch.zeros(samples, length, dtype=torch.bool)
        for row in range(samples):
            count = int(torch.randint(1, length + 1, (1,), generator=generator))
            masks[row, torch.randperm(length, generator=generator)[:count]] = True
        return masks
    if estimator != "stratified":
        raise ValueError(f"estimator must be one of {ESTIMATORS}")
    counts = torch.tensor(mask_counts(length, samples, generator))
    starts = counts.cumsum(0) - counts
    laps = int(starts[-1]) // length + 1
    permutations = torch.stack([torch.randperm(length, generator=generator) for _ in range(laps)])
    # Index k of a lap falls in sample j's window when (k - start_j) mod L < l_j.
    windows = (torch.arange(length)[None, :] - starts[:, None]) % length < counts[:, None]
    # Index k of sample j's lap is position permutations[lap_j, k].
    return torch.zeros(samples, length, dtype=torch.bool).scatter_(1, permutations[starts // length], windows)


def mc_masks(length: int, samples: int, generator: torch.Generator,
             estimator: str = ESTIMATOR) -> list[list[int]]:
    """`draw_masks` as lists: for each sample, the answer positions it hides."""
    return [row.nonzero()[:, 0].tolist() for row in draw_masks(length, samples, generator, estimator)]


def answer_scores(loaded: LoadedModel, prompt_ids: list[int], answer_ids: list[int], masks: list[list[int]],
                  batch_size: int = 32) -> list[float]:
    """Mean cross-entropy at the masked answer positions, one value per mask."""
    [scores] = packed_scores(loaded, [(prompt_ids, answer_ids, masks)], batch_size)
    return scores


def packed_scores(loaded: LoadedModel, items: list[tuple[list[int], list[int], list[list[int]]]],
                  batch_size: int = 32) -> list[list[float]]:
    """`answer_scores` of several answers at once: every (answer, mask) row
    of all `items` (prompt ids, answer ids, masks) pooled in length order
    (`masked_batches`), so the samples of short answers fill the forwards of
    others; the scores are summed on the device and read back once at the
    end."""
    owners = [item for item, (_, _, masks) in enumerate(items) for _ in masks]
    rows = [(prompt + answer, [len(prompt) + p for p in mask]) for prompt, answer, masks in items for mask in masks]
    scores = torch.zeros(len(rows), dtype=torch.float32, device=loaded.device)
    # Padding is hidden from attention and never scored: the mask id serves,
    # so that no tokenizer is needed here.
    for chunk, targets, masked, logits in masked_batches(loaded, rows, batch_size, by_length=True,
                                                         pad_id=loaded.mask_token_id):
        ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
        sums = torch.zeros(len(chunk), device=ce.device).index_add_(0, masked.nonzero()[:, 0], ce)
        scores[torch.tensor(chunk, device=scores.device)] = sums / masked.sum(1)
    result: list[list[float]] = [[] for _ in items]
    for owner, score in zip(owners, scores.tolist()):
        result[owner].append(score)
    return result


def answer_score(loaded: LoadedModel, prompt_ids: list[int], answer: str, samples: int,
                 generator: torch.Generator, batch_size: int = 32, estimator: str = ESTIMATOR) -> float:
    """The estimator's mean score for one answer (its probability is exp(-score))."""
    [score] = answer_score_many(loaded, prompt_ids, [answer], samples, generator, batch_size, estimator)
    return score


def answer_score_many(loaded: LoadedModel, prompt_ids: list[int], answers: list[str], samples: int,
                      generator: torch.Generator, batch_size: int = 32, estimator: str = ESTIMATOR
                      ) -> list[float]:
    """`answer_score` of several answers to one prompt, their masks drawn in
    order (as one call per answer would draw them) and their samples packed
    into shared forwards (`packed_scores`). nan for an answer without tokens."""
    items, where = [], []
    for answer in answers:
        answer_ids = encode_text(loaded.tokenizer, answer)
        if answer_ids:
            where.append(len(items))
            items.append((prompt_ids, answer_ids, mc_masks(len(answer_ids), samples, generator, estimator)))
        else:
            where.append(None)
    scored = packed_scores(loaded, items, batch_size) if items else []
    return [float("nan") if i is None else sum(scored[i]) / len(scored[i]) for i in where]


def covering_masks(length: int, samples: int, generator: torch.Generator,
                   estimator: str = ESTIMATOR) -> list[list[int]]:
    """`mc_masks`, plus one mask of the positions none of them masked, so that
    every token has a per-token estimate."""
    masks = mc_masks(length, samples, generator, estimator)
    missed = sorted(set(range(length)) - {p for mask in masks for p in mask})
    return masks + ([missed] if missed else [])


@torch.no_grad()
def token_log_likelihoods(loaded: LoadedModel, prefix_ids: list[int], ids: list[int], masks: list[list[int]],
                          batch_size: int = 32, bound_masks: Optional[int] = None
                          ) -> tuple[float, list[float], list[float]]:
    """The text's log-likelihood per token and its per-token log-likelihoods,
    from one set of forwards (docs/method.md section 4).

    - The per-token bound: over the first `bound_masks` masks (all by
      default), the mean of each mask's mean log p at its masked tokens: the
      Monte Carlo estimate `answer_score` makes, negated.
    - Token i's value: the mean, over the masks that hide it, of
      log p(x_i | the unmasked tokens); beside it the same mean of Min-K%++'s
      normalised value (log p(x_i) - mu) / sigma, mu and sigma^2 the mean and
      variance of log p under the predicted distribution at i."""
    start, length = len(prefix_ids), len(ids)
    totals = torch.zeros(length, dtype=torch.float64)
    normalised_totals = torch.zeros(length, dtype=torch.float64)
    counts = torch.zeros(length, dtype=torch.float64)
    per_mask: list[float] = []
    rows = [(prefix_ids + ids, [start + p for p in mask]) for mask in masks]
    for chunk, targets, masked, logits in masked_batches(loaded, rows, batch_size, pad_id=loaded.mask_token_id):
        log_probs = torch.log_softmax(logits[masked].float(), dim=-1)
        token = log_probs.gather(1, targets[masked][:, None]).squeeze(1)
        probs = log_probs.exp()
        mu = (probs * log_probs).sum(-1)
        sigma = ((probs * log_probs.square()).sum(-1) - mu.square()).clamp_min(1e-12).sqrt()
        where = (masked.nonzero()[:, 1] - start).cpu()
        totals.index_add_(0, where, token.double().cpu())
        normalised_totals.index_add_(0, where, ((token - mu) / sigma).double().cpu())
        counts.index_add_(0, where, torch.ones_like(where, dtype=torch.float64))
        rows = masked.nonzero()[:, 0]
        sums = torch.zeros(len(chunk), device=token.device).index_add_(0, rows, token)
        per_mask += (sums / masked.sum(1)).tolist()
    bound = per_mask[:bound_masks if bound_masks is not None else len(per_mask)]
    return sum(bound) / len(bound), (totals / counts).tolist(), (normalised_totals / counts).tolist()


@torch.no_grad()
def masked_batches(loaded: LoadedModel, rows: list[tuple[list[int], list[int]]], batch_size: int = 32,
                   by_length: bool = False, pad_id: Optional[int] = None):
    """Run rows of (tokens, positions to mask), `batch_size` per forward (in
    length order with `by_length`), right-padded (with `pad_id`, the
    tokenizer's by default) and the padding hidden from attention. The inputs
    are built on the host and moved once per forward. Yields, per forward,
    the rows' indices, their clean tokens and the masked positions (both
    (rows, width), on the device) and the logits."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0])) if by_length else list(range(len(rows)))
    pad = loaded.pad_id if pad_id is None else pad_id
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        width = max(len(rows[i][0]) for i in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros_like(tokens)
        masked = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, i in enumerate(chunk):
            row_tokens, positions = rows[i]
            tokens[r, :len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
            attention[r, :len(row_tokens)] = 1
            masked[r, positions] = True
        tokens, masked = tokens.to(loaded.device), masked.to(loaded.device)
        inputs = torch.where(masked, loaded.mask_token_id, tokens)
        yield chunk, tokens, masked, model_logits(loaded.model, inputs, attention.to(loaded.device), loaded.family)


def masked_rows(loaded: LoadedModel, rows: list[tuple[list[int], list[int]]], batch_size: int = 32,
                by_length: bool = False):
    """`masked_batches` row by row: each row's index and its logits at its
    masked positions, in the order of those positions."""
    for chunk, _, _, logits in masked_batches(loaded, rows, batch_size, by_length):
        for r, i in enumerate(chunk):
            yield i, logits[r, rows[i][1]]


def next_token_log_probs(loaded: LoadedModel, prompts: list[list[int]], candidates: list[int],
                         batch_size: int = 32) -> list[list[float]]:
    """log p(candidate) at one masked position right after each prompt: a
    single-token answer's likelihood, exact (nothing else is masked)."""
    rows = [(prompt + [loaded.mask_token_id], [len(prompt)]) for prompt in prompts]
    results: list[list[float]] = [[] for _ in prompts]
    for i, logits in masked_rows(loaded, rows, batch_size):
        results[i] = torch.log_softmax(logits[0].float(), dim=-1)[candidates].tolist()
    return results
