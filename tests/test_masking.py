
"""The forward process and the anchor input."""

import dataclasses

import pytest
import torch

from mdu_cli.data.tokenization import Batch, Example, collate
from mdu_cli.methods.masking import EPS, anchor_input_ids, noise_response

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics

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


def test_each_response_position_is_masked_as_often_as_the_inclusion_probability_says():
    """Each of a 4-token answer's positions is masked with probability
    E[t + (1 - t)^4 / 4] = 0.5 + 0.05 (t uniform; the forced mask of an
    otherwise unmasked row lands on any of the four alike), the prompt never.
    A forced mask always put on the first answer token would mask it with
    probability 0.5 + 0.2 and the others 0.5. 40,000 rows: the standard error
    of each frequency is 0.0025, the margin 0.02 both ways."""
    examples = [Example(prompt_ids=(10, 11, 12), response_ids=(20, 21, 22, 23))] * 40_000
    noised = noise_response(collate(examples, PAD), MASK, torch.Generator().manual_seed(0))
    frequency = noised.masked.float().mean(0)
    assert frequency[:3].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(frequency[3:], torch.full((4,), 0.55), atol=0.02), frequency
    forced = noised.masked.sum(1) == 1  # rows with one mask: drawn alone or forced, at any position alike
    by_position = noised.masked[forced].float().mean(0)[3:]
    assert torch.allclose(by_position, torch.full((4,), 0.25), atol=0.02), by_position


def test_anchor_input_masks_prompt_keeps_response_and_padding():
    batch = _batch()
    noised = noise_response(batch, MASK, torch.Generator().manual_seed(3))
    anchor = anchor_input_ids(noised, MASK)
    assert (anchor[batch.prompt_mask] == MASK).all(), "every prompt position, BOS included, is masked"
    assert torch.equal(anchor[batch.response_mask], noised.input_ids[batch.response_mask])
    padding = batch.attention_mask == 0
    assert (anchor[padding] == PAD).all()
    assert torch.equal(anchor[~batch.prompt_mask], noised.input_ids[~batch.prompt_mask])


def _unit_ce_logits(rows: int, width: int, vocab: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose cross-entropy at target 0 is exactly 1 at every position."""
    import math

    boost = math.log(math.exp(-1) * (vocab - 1) / (1 - math.exp(-1)))
    logits = torch.zeros(rows, width, vocab, dtype=torch.float64)
    logits[..., 0] = boost
    return logits, torch.zeros(rows, width, dtype=torch.long)


@pytest.mark.parametrize("length", [1, 3, 10])
def test_inverse_t_losses_are_unbiased_with_the_forced_mask(length):
    """With unit cross-entropy everywhere, the 1/t-weighted MDLM loss of a row
    estimates exactly 1 (sum of CE over the answer / answer length). Averaged
    over many draws of t and masks it must come within 1% of 1, though short
    answers at small t mostly have their single mask forced. (1/t itself gave
    1.42 for 10-token answers.)"""
    from mdu_cli.methods.objectives import mdlm_loss, sequence_log_likelihood

    rows = 100_000
    one = collate([Example(prompt_ids=(1, 2), response_ids=tuple(range(3, 3 + length)))], PAD)
    batch = Batch(*(tensor.repeat(rows, 1) for tensor in (one.input_ids, one.attention_mask, one.prompt_mask,
                                                          one.response_mask)))
    noised = noise_response(batch, MASK, torch.Generator().manual_seed(length))
    logits, _ = _unit_ce_logits(rows, batch.input_ids.shape[1])
    targets = torch.where(noised.masked, torch.zeros_like(noised.targets), noised.targets)
    scored = dataclasses.replace(noised, targets=targets)
    loss = mdlm_loss(logits, scored).item()
    assert loss == pytest.approx(1.0, rel=0.01)
    # The same estimate per row, as NPO reads it: minus the mean log-likelihood per token.
    scores = sequence_log_likelihood(logits, scored)
    assert -scores.mean().item() == pytest.approx(1.0, rel=0.01)
    if length == 10:
        naive = (noised.masked.sum(1) / noised.t / length).mean().item()
        assert naive > 1.3, "the plain 1/t weight over-counts the forced mask (the bug this guards against)"


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_stacked_rows_score_as_in_their_own_batch(family, family_dirs):
    """stack_rows pads the narrower batch to the wider one: padding is never
    attended, so each row's logits over its own width are those of its own
    batch (Dream's shifted logits included), and nothing padded is scored."""
    from mdu_cli.methods.masking import stack_rows
    from mdu_cli.model.families import FAMILIES, model_logits
    from mdu_cli.model.loading import load_model, resolve_source

    source = resolve_source(str(family_dirs[family]))
    model = load_model(source, True, torch.float32).eval()
    fam = FAMILIES[family]
    generator = torch.Generator().manual_seed(0)
    narrow = noise_response(collate([Example((1, 7), (8, 9)), Example((1,), (10, 11, 12))], 0), 5, generator)
    wide = noise_response(collate([Example((1, 7, 8), (9, 10, 11, 12, 13, 14))], 0), 5, generator)
    both = stack_rows(narrow, wide, pad_id=0)
    assert both.input_ids.shape == (3, 9) and not both.masked[:2, 4:].any() and not both.response_mask[:2, 4:].any()
    assert torch.equal(both.mask_prob, torch.cat([narrow.mask_prob, wide.mask_prob]))
    with torch.no_grad():
        stacked = model_logits(model, both.input_ids, both.attention_mask, fam)
        alone = model_logits(model, narrow.input_ids, narrow.attention_mask, fam)
        wide_alone = model_logits(model, wide.input_ids, wide.attention_mask, fam)
    attended = narrow.attention_mask.bool()
    assert torch.allclose(stacked[:2, :4][attended], alone[attended], atol=1e-5)
    assert torch.allclose(stacked[2:], wide_alone, atol=1e-5)
