"""The forward (noising) process of a masked diffusion LM, and the anchor input.

docs/method.md sections 1-2: draw t ~ U[eps, 1) per example and mask each response
token with probability t; the prompt is never masked. The anchor sees the same
noised response with every prompt position masked as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mdu_cli.data.tokenization import Batch  # the padded batch this noises

EPS = 1e-3


@dataclass
class NoisedBatch:
    """A batch after the forward process; tensors are (batch, seq) unless noted.

    input_ids:  the noised sequence [prompt | x_t] (padding untouched)
    targets:    the clean sequence, what masked positions should predict
    masked:     True at the masked response positions (the set M)
    t:          (batch,) the masking probability drawn for each row
    mask_prob:  (batch,) the probability that a given response position of the
                row ends up masked, the forced mask included (see `noise_response`);
                the 1/t-weighted losses weight by 1 / mask_prob
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor
    mask_prob: torch.Tensor


def noise_response(batch: Batch, mask_token_id: int, generator: torch.Generator) -> NoisedBatch:
    """Mask response tokens with probability t per row.

    Random numbers are drawn on the CPU from `generator` so that a seed gives
    the same masks on every device, then moved to the batch's device.
    """
    rows, width = batch.input_ids.shape
    t = EPS + (1 - EPS) * torch.rand(rows, generator=generator)
    draws = torch.rand(rows, width, generator=generator)
    fallback = torch.rand(rows, width, generator=generator)
    device = batch.input_ids.device
    t, draws, fallback = t.to(device), draws.to(device), fallback.to(device)

    masked = (draws < t[:, None]) & batch.response_mask
    # A short answer at small t often gets no mask at all, and would then add
    # nothing to the batch mean; mask one uniformly chosen response token there.
    empty_rows = ~masked.any(dim=1) & batch.response_mask.any(dim=1)
    if empty_rows.any():
        pick = torch.where(batch.response_mask, fallback, torch.full_like(fallback, -1.0)).argmax(dim=1)
        forced = torch.zeros_like(masked)
        forced[torch.arange(rows, device=device), pick] = True
        masked = masked | (forced & empty_rows[:, None])

    noised = torch.where(masked, torch.full_like(batch.input_ids, mask_token_id), batch.input_ids)
    return NoisedBatch(noised, batch.input_ids, batch.attention_mask, batch.prompt_mask,
                       batch.response_mask, masked, t, inclusion_probability(t, batch.response_mask.sum(1)))


def stack_rows(first: NoisedBatch, second: NoisedBatch, pad_id: int) -> NoisedBatch:
    """Two noised batches as one, the narrower right-padded to the wider:
    padding is unattended and never scored, so each row's logits are those
    of its own batch, and `first`'s rows are the first ones, their own width
    from the left."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def pad(tensor: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    def both(name: str, value) -> torch.Tensor:
        return torch.cat([pad(getattr(first, name), value), pad(getattr(second, name), value)])

    return NoisedBatch(both("input_ids", pad_id), both("targets", pad_id), both("attention_mask", 0),
                       both("prompt_mask", False), both("response_mask", False), both("masked", False),
                       torch.cat([first.t, second.t]), torch.cat([first.mask_prob, second.mask_prob]))


def inclusion_probability(t: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """P(a given response position is masked) for rows of `lengths` response
    tokens masked at rate t, when a row left without any mask gets one forced,
    uniformly chosen position: t + (1 - t) ** L / L.

    Weighting each masked position by the inverse of this (a Horvitz-Thompson
    estimate) makes sum over masked positions of CE / p an unbiased estimate of
    the sum of CE over the response, as 1/t is without the forced mask; 1/t
    itself would count the forced position (probability (1-t)^L) on top, which
    for 10-token answers inflates the estimate by 42% on average. (batch,)
    """
    t = t.double()
    length = lengths.to(t.device).double().clamp(min=1)
    return (t + (1 - t) ** length / length).float()


def anchor_input_ids(noised: NoisedBatch, mask_token_id: int) -> torch.Tensor:
    """The anchor's input: every prompt position (BOS and template tokens
    included) replaced by the mask token; the noised response and the padding
    are exactly as in the conditional input. (batch, seq)"""
    return torch.where(noised.prompt_mask, torch.full_like(noised.input_ids, mask_token_id), noised.input_ids)
