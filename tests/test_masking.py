"""The forward process and the anchor input."""

import torch

from mdu_cli.masking import EPS, anchor_input_ids, noise_response
from mdu_cli.tokenization import Example, collate

MASK = 99
PAD = 0


def _batch():
    examples = [
        Example(prompt_ids=(10, 11, 12), response_ids=(20, 21, 22, 23, 24)),
        Example(prompt_ids=(10, 13), response_ids=(25,)),
        Example(prompt_ids=(10, 11, 12, 14, 15), response_ids=(26, 27)),
    ]
    return collate(examples, PAD)


def test_collate_marks_prompt_response_and_padding():
    batch = _batch()
    assert batch.input_ids.tolist()[1] == [10, 13, 25, PAD, PAD, PAD, PAD, PAD]
    assert batch.attention_mask.tolist()[1] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch.prompt_mask.tolist()[1] == [True, True] + [False] * 6
    assert batch.response_mask.tolist()[1] == [False, False, True] + [False] * 5
    assert not (batch.prompt_mask & batch.response_mask).any()


def test_noise_masks_only_response_and_every_row():
    batch = _batch()
    for seed in range(50):
        noised = noise_response(batch, MASK, torch.Generator().manual_seed(seed))
        assert (noised.masked <= batch.response_mask).all()
        assert noised.masked.any(dim=1).all(), "every row scores at least one position"
        assert ((noised.input_ids == MASK) == noised.masked).all()
        assert (noised.input_ids[~noised.masked] == batch.input_ids[~noised.masked]).all()
        assert ((noised.t >= EPS) & (noised.t < 1)).all()


def test_masking_rate_follows_t():
    examples = [Example(prompt_ids=(1,), response_ids=tuple(range(2, 402)))] * 8
    noised = noise_response(collate(examples, PAD), MASK, torch.Generator().manual_seed(0))
    rates = noised.masked.float().sum(1) / 400
    assert torch.allclose(rates, noised.t, atol=0.08)


def test_anchor_input_masks_prompt_keeps_response_and_padding():
    batch = _batch()
    noised = noise_response(batch, MASK, torch.Generator().manual_seed(3))
    anchor = anchor_input_ids(noised, MASK)
    assert (anchor[batch.prompt_mask] == MASK).all(), "every prompt position, BOS included, is masked"
    assert torch.equal(anchor[batch.response_mask], noised.input_ids[batch.response_mask])
    padding = batch.attention_mask == 0
    assert (anchor[padding] == PAD).all()
    assert torch.equal(anchor[~batch.prompt_mask], noised.input_ids[~batch.prompt_mask])
