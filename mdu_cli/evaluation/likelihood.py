"""The answer-probability estimator of a masked diffusion LM (docs/method.md
section 4): for each of n samples draw l ~ U{1..L} (L = answer length), mask l
answer tokens chosen uniformly without replacement, and score the mean
cross-entropy at the masked positions; probability = exp(-mean score).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mdu_cli.data.tokenization import encode_text
from mdu_cli.model.families import model_logits
from mdu_cli.model.inference import LoadedModel


def mc_masks(length: int, samples: int, generator: torch.Generator) -> list[list[int]]:
    """For each sample, the answer positions it masks: l ~ U{1..length}, then l
    distinct positions uniformly."""
    masks = []
    for _ in range(samples):
        count = int(torch.randint(1, length + 1, (1,), generator=generator))
        masks.append(sorted(torch.randperm(length, generator=generator)[:count].tolist()))
    return masks


def _masked_logits(loaded: LoadedModel, sequence: torch.Tensor, start: int,
                   chunk: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of `sequence` once per mask of `chunk` (positions counted
    from `start`), each with its positions masked: the (rows, length) mask and
    the logits at the masked positions, row by row."""
    inputs = sequence.repeat(len(chunk), 1)
    masked = torch.zeros_like(inputs, dtype=torch.bool)
    for row, positions in enumerate(chunk):
        masked[row, [start + p for p in positions]] = True
    inputs[masked] = loaded.mask_token_id
    logits = model_logits(loaded.model, inputs, torch.ones_like(inputs), loaded.family)
    return masked, logits[masked]


@torch.no_grad()
def answer_scores(loaded: LoadedModel, prompt_ids: list[int], answer_ids: list[int], masks: list[list[int]],
                  batch_size: int = 32) -> list[float]:
    """Mean cross-entropy at the masked answer positions, one value per mask."""
    sequence = torch.tensor(prompt_ids + answer_ids, dtype=torch.long, device=loaded.device)
    start = len(prompt_ids)
    scores = []
    for first in range(0, len(masks), batch_size):
        chunk = masks[first:first + batch_size]
        masked, logits = _masked_logits(loaded, sequence, start, chunk)
        ce = F.cross_entropy(logits.float(), sequence.repeat(len(chunk), 1)[masked], reduction="none")
        counts = masked.sum(1)
        sums = torch.zeros(len(chunk), device=ce.device).index_add_(0, masked.nonzero()[:, 0], ce)
        scores += (sums / counts).tolist()
    return scores


def answer_score(loaded: LoadedModel, prompt_ids: list[int], answer: str, samples: int,
                 generator: torch.Generator, batch_size: int = 32) -> float:
    """The estimator's mean score for one answer (its probability is exp(-score))."""
    answer_ids = encode_text(loaded.tokenizer, answer)
    if not answer_ids:
        return float("nan")
    scores = answer_scores(loaded, prompt_ids, answer_ids, mc_masks(len(answer_ids), samples, generator), batch_size)
    return sum(scores) / len(scores)


def covering_masks(length: int, samples: int, generator: torch.Generator) -> list[list[int]]:
    """`mc_masks`, plus one mask of the positions none of them masked, so that
    every token has a per-token estimate."""
    masks = mc_masks(length, samples, generator)
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
    sequence = torch.tensor(prefix_ids + ids, dtype=torch.long, device=loaded.device)
    start, length = len(prefix_ids), len(ids)
    totals = torch.zeros(length, dtype=torch.float64)
    normalised_totals = torch.zeros(length, dtype=torch.float64)
    counts = torch.zeros(length, dtype=torch.float64)
    per_mask: list[float] = []
    for first in range(0, len(masks), batch_size):
        chunk = masks[first:first + batch_size]
        masked, logits = _masked_logits(loaded, sequence, start, chunk)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        token = log_probs.gather(1, sequence.repeat(len(chunk), 1)[masked][:, None]).squeeze(1)
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
def masked_rows(loaded: LoadedModel, rows: list[tuple[list[int], list[int]]], batch_size: int = 32,
                by_length: bool = False):
    """Run rows of (tokens, positions to mask), `batch_size` per forward (in
    length order with `by_length`), right-padded with the padding hidden from
    attention; yield each row's index and its logits at the masked positions."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0])) if by_length else range(len(rows))
    order = list(order)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        width = max(len(rows[i][0]) for i in chunk)
        inputs = torch.full((len(chunk), width), loaded.pad_id, dtype=torch.long)
        attention = torch.zeros_like(inputs)
        for r, i in enumerate(chunk):
            tokens, positions = rows[i]
            inputs[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            inputs[r, positions] = loaded.mask_token_id
            attention[r, :len(tokens)] = 1
        logits = model_logits(loaded.model, inputs.to(loaded.device), attention.to(loaded.device), loaded.family)
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
