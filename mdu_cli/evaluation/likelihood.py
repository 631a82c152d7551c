"""The answer-probability estimator of a masked diffusion LM (docs/method.md
section 4): for each of n samples draw l ~ U{1..L} (L = answer length), mask l
answer tokens chosen uniformly without replacement, and score the mean
cross-entropy at the masked positions; probability = exp(-mean score).
"""

from __future__ import annotations

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


@torch.no_grad()
def answer_scores(loaded: LoadedModel, prompt_ids: list[int], answer_ids: list[int], masks: list[list[int]],
                  batch_size: int = 32) -> list[float]:
    """Mean cross-entropy at the masked answer positions, one value per mask."""
    sequence = torch.tensor(prompt_ids + answer_ids, dtype=torch.long, device=loaded.device)
    start = len(prompt_ids)
    scores = []
    for first in range(0, len(masks), batch_size):
        chunk = masks[first:first + batch_size]
        inputs = sequence.repeat(len(chunk), 1)
        masked = torch.zeros_like(inputs, dtype=torch.bool)
        for row, positions in enumerate(chunk):
            masked[row, [start + p for p in positions]] = True
        inputs[masked] = loaded.mask_token_id
        logits = model_logits(loaded.model, inputs, torch.ones_like(inputs), loaded.family)
        ce = F.cross_entropy(logits[masked].float(), sequence.repeat(len(chunk), 1)[masked], reduction="none")
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
