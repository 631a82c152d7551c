"""RWKU's measures against hand computations, and the masked-diffusion
likelihoods they read (per token, one masked position) against float64
computations written out here; the sampler's top-p against an independent
draw."""

import math
import zlib

import numpy as np
import pytest
import torch
from test_evaluation import TableModel, _loaded

from mdu_cli.evaluation.benchmarks.rwku import measures
from mdu_cli.evaluation.likelihood import (
    answer_scores,
    covering_masks,
    mc_masks,
    next_token_log_probs,
    token_log_likelihoods,
)
from mdu_cli.model.families import FAMILIES
from mdu_cli.model.sampling import generate, nucleus

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("prediction, answer, want", [
    # Summary-level LCS, the `rouge` package's ROUGE-L: the answer's words are
    # matched across the prediction's sentences (split at '.'): the, cat, sat
    # in the first, red in the second: 4 of 4. One LCS over all words gives 3/4.
    ("the cat sat on the mat. it was red", "the red cat sat", 1.0),
    ("the cat sat on the mat it was red", "the red cat sat", 0.75),
    ("The Cat", "the cat", 0.0),            # no lower-casing
    ("cat, dog", "cat dog", 0.5),           # punctuation stays on the word
    ("Stephen King", "Stephen King", 1.0),
    ("NOANSWER", "Stephen King", 0.0),
    (".", "Stephen King", 0.0),             # nothing left once split: 0, where the package raises
])
def test_rouge_l_recall_as_the_rouge_package_gives_it(prediction, answer, want):
    assert measures.rouge_l_recall(prediction, answer) == pytest.approx(want)


def test_the_paper_preset_rouge_is_rouge_scores_stemmed_recall():
    """Against the reference package itself, on hand-picked and random strings."""
    import random

    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    words = ["The", "cats", "running", "runs", "cat", "Stephen", "King", "wrote", "Carrie,", "in", "1974.", "a"]
    rng = random.Random(0)
    cases = [("The Cats, running", "the cat runs"), ("Stephen King wrote Carrie in 1974.", "carrie by king")]
    cases += [(" ".join(rng.choices(words, k=rng.randint(1, 9))), " ".join(rng.choices(words, k=rng.randint(1, 6))))
              for _ in range(200)]
    for prediction, answer in cases:
        want = scorer.score(answer, prediction)["rougeL"].recall
        assert measures.paper_rouge_l_recall(prediction, answer) == pytest.approx(want), (prediction, answer)


def test_exact_match_f1_and_containment_by_hand():
    assert measures.exact_match("The Beatles!", ["beatles", "x"]) == 1.0
    assert measures.exact_match("the beatles band", ["beatles"]) == 0.0
    # pred {beatles, band}, gold {beatles}: precision 1/2, recall 1: F1 2/3; the best over the answers
    assert measures.token_f1("the beatles band", ["beatles", "rolling stones"]) == pytest.approx(2 / 3)
    assert measures.token_f1("", ["a"]) == 1.0  # both empty after normalisation: they agree
    assert measures.contains_answer("It was US Airways Flight 1549.", ["us airways flight 1549"]) == 1.0
    assert measures.contains_answer("flight 15490", ["flight 1549"]) == 0.0  # whole words only


def test_bbh_and_mmlu_predictions():
    assert measures.bbh_prediction("Step one. So the answer is (B). Then more.") == "(B)"
    assert measures.bbh_prediction("  no marker here ") == "no marker here"
    assert measures.bbh_prediction("   ") == measures.NO_ANSWER
    assert measures.first_letter("I think B is right", 4) == 1
    assert measures.first_letter("Answer: E", 4) is None


def test_mia_scores_by_hand():
    ll = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]
    normalised = [0.5, -0.5, 1.5, -2.5, 0.0, 3.0, -1.0, 2.0, 1.0, -3.5]
    text = "Stephen King wrote Carrie."
    scores = measures.mia_scores(text, -5.25, ll, normalised)
    assert scores["loss"] == -5.25
    assert scores["zlib"] == pytest.approx(-5.25 / len(zlib.compress(text.encode())))
    assert scores["mink"] == pytest.approx((-10 - 9) / 2)          # the lowest 20% of 10: two values
    assert scores["mink++"] == pytest.approx((-3.5 - 2.5) / 2)
    # Fewer than five tokens: RWKU's int(n * 0.2) is 0; one token, not an empty mean.
    assert measures.mia_scores("ab", -2.0, [-1.0, -3.0], [0.0, -1.0])["mink"] == -3.0


def test_auc_by_hand():
    # pairs (member, non-member): 3>0 3>2 2>0 2=2 1>0 1<2 -> 1+1+1+0.5+1+0 of 6
    assert measures.auc([3, 2, 1], [0, 2]) == pytest.approx(4.5 / 6)
    assert measures.auc([5, 6], [1, 2]) == 1.0 and measures.auc([1], [5]) == 0.0
    assert measures.auc([], [1]) is None


def test_truthful_mc_by_hand():
    mc1 = {"true": [-2.0], "false": [-3.0, -2.5]}
    mc2 = {"true": [math.log(0.2), math.log(0.1)], "false": [math.log(0.3)]}
    got1, got2 = measures.truthful_mc(mc1, mc2)
    assert got1 == 1.0 and got2 == pytest.approx(0.3 / 0.6)
    assert measures.truthful_mc({"true": [-3.0], "false": [-1.0]}, mc2)[0] == 0.0
    # Log-likelihoods far below exp's range still give the right share.
    assert measures.truthful_mc(mc1, {"true": [-2000.0], "false": [-2000.0 + math.log(3)]})[1] == pytest.approx(0.25)


def test_fluency_entropy_by_hand():
    # words a b a b: bigrams ab ba ab (2/3, 1/3), trigrams aba bab (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert measures.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert measures.ngram_entropy("") == 0.0 and measures.ngram_entropy("word") == 0.0
    # NLTK's tokens: punctuation is its own word
    assert measures._words("Hi there. Ok!") == ["Hi", "there", ".", "Ok", "!"]


def test_covering_masks_hide_every_token():
    masks = covering_masks(40, 3, torch.Generator().manual_seed(0))
    assert {p for m in masks for p in m} == set(range(40))
    assert masks[:3] == mc_masks(40, 3, torch.Generator().manual_seed(0)), "the Monte Carlo masks come first"


@pytest.mark.parametrize("family, samples", [("llada", 7), ("dream", 7), ("llada", 1)])
def test_token_log_likelihoods_against_float64(family, samples):
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(12, 9, generator=gen)
    loaded = _loaded(TableModel(table, reads_input=True), family)
    prefix, ids = [5], [6, 7, 8, 2, 1, 4]
    masks = covering_masks(len(ids), samples, torch.Generator().manual_seed(4))
    bound, ll, normalised = token_log_likelihoods(loaded, prefix, ids, masks, batch_size=3, bound_masks=samples)
    sums, norm_sums, counts = np.zeros(len(ids)), np.zeros(len(ids)), np.zeros(len(ids))
    per_mask = []
    shift = 1 if family == "dream" else 0
    for mask in masks:
        tokens = np.array(prefix + ids)
        for p in mask:
            tokens[len(prefix) + p] = 0
        logits = table.double().numpy()[:len(tokens)] + 0.01 * tokens[:, None]
        mask_values = []
        for p in mask:
            at = len(prefix) + p - shift   # Dream reads token i at position i - 1
            row = logits[at] - np.log(np.exp(logits[at]).sum())
            probs = np.exp(row)
            mu, var = (probs * row).sum(), (probs * row ** 2).sum() - (probs * row).sum() ** 2
            sums[p] += row[ids[p]]
            norm_sums[p] += (row[ids[p]] - mu) / math.sqrt(var)
            counts[p] += 1
            mask_values.append(row[ids[p]])
        per_mask.append(np.mean(mask_values))
    # The per-token bound: the Monte Carlo masks' own means (the covering mask is not one of them).
    assert bound == pytest.approx(np.mean(per_mask[:samples]), rel=1e-5)
    assert bound == pytest.approx(-np.mean(answer_scores(loaded, prefix, ids, masks[:samples])), rel=1e-5)
    if samples == 1:
        assert len(masks) == 2, "one sample leaves tokens unmasked: the covering mask scores them"
    assert ll == pytest.approx(list(sums / counts), rel=1e-5)
    assert normalised == pytest.approx(list(norm_sums / counts), rel=1e-5, abs=1e-6)


def test_one_masked_position_is_the_exact_next_token_probability():
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(10, 7, generator=gen)
    loaded = _loaded(TableModel(table), "llada")
    loaded.tokenizer = type("T", (), {"pad_token_id": 0, "eos_token_id": 0})()
    prompts = [[1, 2, 3], [4, 5], [6]]
    got = next_token_log_probs(loaded, prompts, [2, 4, 6], batch_size=2)
    logp = table.double().log_softmax(-1).numpy()
    for prompt, values in zip(prompts, got):
        assert values == pytest.approx([logp[len(prompt), c] for c in (2, 4, 6)], rel=1e-6)
        # The same number as the Monte Carlo estimator of a one-token answer (its only mask).
        [score] = answer_scores(loaded, prompt, [4], [[0]])
        assert -score == pytest.approx(values[1], rel=1e-6)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.2, 0.25]])
    kept = nucleus(probs.log(), 0.7).isfinite()[0].tolist()
    assert kept == [False, True, False, True]        # 0.5 + 0.25 reaches 0.7
    assert nucleus(probs.log(), 0.75).isfinite()[0].tolist() == [False, True, False, True]
    assert nucleus(probs.log(), 0.76).isfinite()[0].tolist() == [False, True, True, True]
    assert nucleus(probs.log(), 0.01).isfinite()[0].tolist() == [False, True, False, False]


def test_top_p_sampling_draws_from_the_renormalised_nucleus():
    """Many one-token generations from a fixed distribution: no token outside
    the nucleus appears, and the frequencies fit the nucleus's renormalised
    probabilities, worked out here in float64 (chi-square p far from 0)."""
    from scipy.stats import chisquare

    vocab, mask, rows = 8, 0, 4000
    logits = torch.tensor([-30.0, 1.0, 2.5, 0.0, 2.0, -1.0, 1.5, 0.5])
    table = logits.repeat(4, 1)
    temperature, top_p = 0.8, 0.8
    out = generate(TableModel(table), FAMILIES["llada"], mask, [[1]] * rows, max_new_tokens=1, steps=1,
                   block_length=1, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(0))
    drawn = np.bincount([o[0] for o in out], minlength=vocab)
    # Independent: probabilities at the temperature, sorted, the prefix reaching top_p.
    p = np.exp(logits.double().numpy()[1:] / temperature)
    p = p / p.sum()
    order = np.argsort(-p)
    cumulative, keep = 0.0, []
    for index in order:
        keep.append(index + 1)
        cumulative += p[index]
        if cumulative >= top_p:
            break
    expected = np.zeros(vocab)
    expected[keep] = p[np.array(keep) - 1] / p[np.array(keep) - 1].sum()
    assert set(np.flatnonzero(drawn)) == set(keep), "only nucleus tokens are drawn"
    assert chisquare(drawn[keep], expected[keep] * rows).pvalue > 1e-4
