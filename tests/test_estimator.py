"""The answer-likelihood estimator (mdu_cli/evaluation/likelihood.py): the
stratified mask counts keep it unbiased, checked against an exact enumeration
of every mask on a tiny model in float64; its samples packed across answers
score what one answer at a time scores."""

import itertools
import math

import numpy as np
import pytest
import torch

from mdu_cli.evaluation.likelihood import answer_scores, draw_masks, mask_counts, mc_masks, packed_scores
from mdu_cli.model.families import model_logits
from mdu_cli.model.inference import load_for_inference

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("length, samples", [(1, 4), (5, 3), (7, 128), (40, 16)])
def test_stratified_counts_are_uniform_for_a_random_sample(length, samples):
    """Sample j's rate lies in its stratum [j/n, (j+1)/n), so its count in
    [floor(jL/n) + 1, floor((j+1)L/n) + 1]; over 4000 offsets, a sample picked
    at random has l ~ U{1..L} (the mean over samples estimates what
    independent draws estimate)."""
    histogram = np.zeros(length + 1)
    for seed in range(4000):
        drawn = mask_counts(length, samples, torch.Generator().manual_seed(seed))
        assert len(drawn) == samples
        for j, count in enumerate(drawn):
            assert math.floor(j * length / samples) + 1 <= count <= min(length, math.floor((j + 1) * length / samples) + 1)
        np.add.at(histogram, drawn, 1)
    share = histogram[1:] / histogram.sum()
    assert histogram[0] == 0
    # Measured: within 0.002 of 1/L for these shapes (the offset is the only
    # randomness, and each stratum spans at most a few counts); a skewed rule
    # (rounding instead of the floor halves the share of l = 1) is far outside.
    assert np.abs(share - 1 / length).max() < 0.1 / length


def test_masks_hide_the_drawn_count_of_distinct_uniform_positions():
    masks = draw_masks(6, 6000, torch.Generator().manual_seed(1))
    counts = masks.sum(1)
    assert counts.min() >= 1 and counts.max() <= 6
    assert np.bincount(counts.numpy(), minlength=7)[1:].tolist() == [1000] * 6, "the grid gives exact shares"
    ones = masks[counts == 1].float().mean(0)
    assert ones.min() > 0.13 and ones.max() < 0.2, "which single position is hidden is uniform"
    listed = mc_masks(6, 50, torch.Generator().manual_seed(1))
    assert [len(m) for m in listed] == draw_masks(6, 50, torch.Generator().manual_seed(1)).sum(1).tolist()


def _exact_score(model, family, mask_id, prompt, answer) -> float:
    """E over l ~ U{1..L} and a uniform l-subset S of the mean cross-entropy
    at S, by enumerating every subset, in float64, with numpy's log-softmax."""
    length = len(answer)
    total = 0.0
    for count in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), count))
        for subset in subsets:
            tokens = prompt + answer
            ids = torch.tensor([[mask_id if i - len(prompt) in subset else t for i, t in enumerate(tokens)]])
            with torch.no_grad():
                logits = model_logits(model, ids, torch.ones_like(ids), family)[0].double().numpy()
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            ce = -np.mean([logp[len(prompt) + p, answer[p]] for p in subset])
            total += ce / (length * len(subsets))
    return total


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_both_estimators_are_unbiased_against_exact_enumeration(family, family_dirs):
    """Mean of the Monte Carlo score over 150 seeds of 8 samples against the
    exact expectation (all 31 masks of a 5-token answer), within 4.5
    standard errors of the seed means; a count distribution off by one
    (l ~ U{0..L-1} + 1 skipping L, say) moves it by many more."""
    loaded = load_for_inference(str(family_dirs[family]), trust_remote_code=True, device="cpu")
    model64 = load_for_inference(str(family_dirs[family]), trust_remote_code=True, device="cpu").model.double()
    prompt = loaded.prompt_ids([{"role": "user", "content": "who wrote the book ?"}])
    answer = loaded.tokenizer("the author of the lake", add_special_tokens=False)["input_ids"][:5]
    assert len(answer) == 5
    exact = _exact_score(model64, loaded.family, loaded.mask_token_id, prompt, answer)
    for estimator in ("stratified", "independent"):
        means = []
        for seed in range(150):
            masks = mc_masks(len(answer), 8, torch.Generator().manual_seed(seed), estimator)
            means.append(np.mean(answer_scores(loaded, prompt, answer, masks)))
        se = np.std(means, ddof=1) / math.sqrt(len(means))
        assert abs(np.mean(means) - exact) < 4.5 * se, (estimator, np.mean(means), exact, se)


def test_packed_answers_score_what_one_answer_at_a_time_scores(dream_dir):
    """Samples of three answers of different lengths pooled into shared,
    right-padded forwards (batch 5, so forwards mix answers): each sample's
    score as alone, to float tolerance (the padding is unattended)."""
    loaded = load_for_inference(str(dream_dir), trust_remote_code=True, device="cpu")
    prompt = loaded.prompt_ids([{"role": "user", "content": "who wrote the book ?"}])
    answers = [loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("the author", "a writer from the city by the lake", "nobody knows who")]
    generator = torch.Generator().manual_seed(0)
    items = [(prompt, ids, mc_masks(len(ids), 6, generator)) for ids in answers]
    packed = packed_scores(loaded, items, batch_size=5)
    for (p, ids, masks), got in zip(items, packed):
        alone = [answer_scores(loaded, p, ids, [mask], batch_size=1)[0] for mask in masks]
        assert got == pytest.approx(alone, rel=1e-5, abs=1e-6)
