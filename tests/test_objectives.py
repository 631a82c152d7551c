"""The losses against independent float64 computations.

The reference values are computed position by position with numpy in float64
from the definitions in docs/method.md, not with the functions under test.
"""

import math

import numpy as np
import pytest
import torch

from mdu_cli.methods.masking import NoisedBatch
from mdu_cli.methods.objectives import cart_weights, divergence, mdlm_loss, mdu_forget_loss


def _batch(targets, masked, response, mask_prob, attention=None) -> NoisedBatch:
    """What the losses read of a noised batch, from loose test tensors (the
    noised input itself is not read by them)."""
    return NoisedBatch(input_ids=targets, targets=targets,
                       attention_mask=attention if attention is not None else torch.ones_like(targets),
                       prompt_mask=~response.bool(), response_mask=response, masked=masked, t=mask_prob,
                       mask_prob=mask_prob)

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


def _softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    e = np.exp(shifted)
    return e / e.sum()


def _reference_forget_loss(cond, anchor, masked, tau, eta, direction) -> float:
    """Mean over masked positions of the divergence, float64, one position at a time."""
    losses = []
    for b in range(cond.shape[0]):
        for i in range(cond.shape[1]):
            if not masked[b, i]:
                continue
            l_c = cond[b, i].astype(np.float64)
            l_u = anchor[b, i].astype(np.float64)
            target = tau * (l_u - eta * (l_c - l_u))
            p, q = _softmax64(l_c), _softmax64(target)
            kl = lambda a, b_: float(np.sum(a * (np.log(a) - np.log(b_))))  # noqa: E731
            if direction == "forward":
                losses.append(kl(p, q))
            elif direction == "reverse":
                losses.append(kl(q, p))
            else:
                m = (p + q) / 2
                losses.append(0.5 * kl(p, m) + 0.5 * kl(q, m))
    return sum(losses) / len(losses)


@pytest.fixture
def logits_case():
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 7, 11, generator=gen) * 2
    anchor = torch.randn(3, 7, 11, generator=gen) * 2
    masked = torch.rand(3, 7, generator=gen) < 0.5
    masked[0, 0] = True
    return cond, anchor, masked


@pytest.mark.parametrize("direction", ["forward", "reverse", "js"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_forget_loss_matches_float64_reference(logits_case, direction, tau, eta):
    cond, anchor, masked = logits_case
    got = mdu_forget_loss(cond, anchor, masked, tau=tau, eta=eta, direction=direction)
    want = _reference_forget_loss(cond.numpy(), anchor.numpy(), masked.numpy(), tau, eta, direction)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_forget_loss_in_bf16_is_computed_in_fp32(logits_case):
    cond, anchor, masked = logits_case
    got = mdu_forget_loss(cond.bfloat16(), anchor.bfloat16(), masked, tau=1.0)
    want = _reference_forget_loss(cond.bfloat16().float().numpy(), anchor.bfloat16().float().numpy(),
                                  masked.numpy(), 1.0, 0.0, "forward")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_tau_zero_forward_kl_is_log_vocab_minus_entropy(logits_case):
    """At tau = 0 the target is uniform: KL(p || u) = log V - H(p)."""
    cond, anchor, masked = logits_case
    got = mdu_forget_loss(cond, anchor, masked, tau=0.0).item()
    entropies = []
    for b, i in masked.nonzero().tolist():
        p = _softmax64(cond[b, i].double().numpy())
        entropies.append(-(p * np.log(p)).sum())
    assert got == pytest.approx(math.log(11) - float(np.mean(entropies)), rel=1e-5)


def test_pre_gathered_anchor_gives_the_same_loss(logits_case):
    cond, anchor, masked = logits_case
    full = mdu_forget_loss(cond, anchor, masked, tau=2.0, eta=0.3, direction="js")
    gathered = mdu_forget_loss(cond, anchor[masked], masked, tau=2.0, eta=0.3, direction="js")
    assert torch.equal(full, gathered)


def test_loss_is_zero_when_model_equals_anchor_at_tau_one(logits_case):
    cond, _, masked = logits_case
    assert mdu_forget_loss(cond, cond.clone(), masked, tau=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_flows_only_through_the_conditional(logits_case):
    cond, anchor, masked = logits_case
    cond = cond.clone().requires_grad_(True)
    anchor = anchor.clone().requires_grad_(True)
    mdu_forget_loss(cond, anchor, masked, tau=1.0, eta=0.5).backward()
    assert anchor.grad is None or torch.count_nonzero(anchor.grad) == 0
    assert torch.count_nonzero(cond.grad[~masked]) == 0  # unmasked positions never contribute
    assert torch.count_nonzero(cond.grad[masked]) > 0


def test_unmasked_positions_do_not_change_the_loss(logits_case):
    cond, anchor, masked = logits_case
    before = mdu_forget_loss(cond, anchor, masked, tau=1.0).item()
    cond2 = cond.clone()
    cond2[~masked] = 100.0
    assert mdu_forget_loss(cond2, anchor, masked, tau=1.0).item() == pytest.approx(before, rel=1e-6)


def test_divergence_rejects_unknown_direction():
    with pytest.raises(ValueError):
        divergence(torch.zeros(1, 3), torch.zeros(1, 3), "sideways")


def _reference_mdlm_loss(logits, targets, masked, response, t, weights=None) -> float:
    total = 0.0
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            if masked[b, i]:
                p = _softmax64(logits[b, i].astype(np.float64))
                w = 1.0 / float(t[b]) if weights is None else float(weights[b][i])
                total += w * -math.log(p[targets[b, i]])
    return total / int(response.sum())


def test_mdlm_retain_loss_inverse_t_matches_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=gen)
    targets = torch.randint(0, 9, (2, 6), generator=gen)
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    masked = response & torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([0.3, 0.8])
    got = mdlm_loss(logits, _batch(targets, masked, response, t)).item()
    want = _reference_mdlm_loss(logits.numpy(), targets.numpy(), masked.numpy(), response.numpy(), t.numpy())
    assert got == pytest.approx(want, rel=1e-5)


def _reference_cart(masked_row, attention_row, p=0.3):
    """Dream's CART weight, straight from the definition."""
    weights = []
    for i in range(len(masked_row)):
        total = 0.0
        for j in range(len(masked_row)):
            if j != i and attention_row[j] and not masked_row[j]:
                total += 0.5 * p * (1 - p) ** (abs(i - j) - 1)
        weights.append(total)
    return weights


def test_cart_weights_match_definition():
    masked = torch.tensor([[0, 0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    got = cart_weights(masked, attention)
    for row in range(2):
        want = _reference_cart(masked[row].tolist(), attention[row].tolist())
        assert got[row].tolist() == pytest.approx(want, rel=1e-6)


def test_mdlm_retain_loss_with_cart_matches_reference():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 9, generator=gen)
    targets = torch.randint(0, 9, (2, 6), generator=gen)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    masked = response & torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    got = mdlm_loss(logits, _batch(targets, masked, response, torch.tensor([0.5, 0.5]), attention), "cart").item()
    weights = [_reference_cart(masked[r].tolist(), attention[r].tolist()) for r in range(2)]
    want = _reference_mdlm_loss(logits.numpy(), targets.numpy(), masked.numpy(), response.numpy(), None, weights)
    assert got == pytest.approx(want, rel=1e-5)


def _reference_sequence_ll(logits, targets, masked, t, response, weights=None):
    """Per row: sum over masked positions of log p(target) / t (or x the given
    weight), over the row's response tokens; float64 loops."""
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for i in range(logits.shape[1]):
            if masked[b, i]:
                weight = 1 / float(t[b]) if weights is None else float(weights[b, i])
                total += weight * math.log(_softmax64(logits[b, i].astype(np.float64))[targets[b, i]])
        out.append(total / int(response[b].sum()))
    return out


def test_gradient_ascent_is_the_negated_mdlm_loss():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 9, generator=gen)
    targets = torch.randint(0, 9, (2, 6), generator=gen)
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    masked = response & torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([0.25, 0.6])
    from mdu_cli.methods.objectives import gradient_ascent_loss

    got = gradient_ascent_loss(logits, _batch(targets, masked, response, t)).item()
    want = -_reference_mdlm_loss(logits.numpy(), targets.numpy(), masked.numpy(), response.numpy(), t.numpy())
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_matches_float64_reference(beta):
    from mdu_cli.methods.objectives import npo_loss

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 7, generator=gen)
    anchor = torch.randn(3, 5, 7, generator=gen)
    targets = torch.randint(0, 7, (3, 5), generator=gen)
    masked = torch.rand(3, 5, generator=gen) < 0.6
    masked[:, 2] = True
    t = torch.tensor([0.2, 0.5, 0.9])
    response = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    masked &= response
    from mdu_cli.methods.objectives import sequence_log_likelihood

    got = npo_loss(sequence_log_likelihood(logits, _batch(targets, masked, response, t)),
                   sequence_log_likelihood(anchor, _batch(targets, masked, response, t)), beta).item()
    s_model = _reference_sequence_ll(logits.numpy(), targets.numpy(), masked.numpy(), t.numpy(), response.numpy())
    s_ref = _reference_sequence_ll(anchor.numpy(), targets.numpy(), masked.numpy(), t.numpy(), response.numpy())
    # (2 / beta) * mean log(1 + (pi / pi_ref) ** beta), written as in the NPO paper.
    want = (2 / beta) * np.mean([math.log(1 + math.exp(beta * (a - b))) for a, b in zip(s_model, s_ref)])
    assert got == pytest.approx(want, rel=1e-5)


def test_npo_at_the_anchor_has_the_known_gradient():
    """At theta = theta_ref the NPO gradient is exactly that of the mean sequence
    log-likelihood (d/ds of (2/beta) softplus(beta s) at s = 0 is 1), so it
    pushes likelihood down like GA, only bounded."""
    from mdu_cli.methods.objectives import npo_loss, sequence_log_likelihood

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 5, generator=gen, requires_grad=True)
    targets = torch.randint(0, 5, (2, 4), generator=gen)
    masked = torch.ones(2, 4, dtype=torch.bool)
    t = torch.tensor([0.5, 0.5])
    reference = sequence_log_likelihood(logits.detach().clone(), _batch(targets, masked, masked, t))
    npo_loss(sequence_log_likelihood(logits, _batch(targets, masked, masked, t)), reference, beta=0.1).backward()
    npo_grad = logits.grad.clone()
    logits.grad = None
    sequence_log_likelihood(logits, _batch(targets, masked, masked, t)).mean().backward()
    assert torch.allclose(npo_grad, logits.grad, atol=1e-6)


def test_loss_in_recomputed_blocks_matches_reference_and_gradient(logits_case, monkeypatch):
    import mdu_cli.methods.objectives as objectives

    cond, anchor, masked = logits_case
    cond = cond.clone().requires_grad_(True)
    whole = objectives.mdu_forget_loss(cond, anchor, masked, tau=2.0, eta=0.5, direction="reverse")
    whole.backward()
    whole_grad = cond.grad.clone()
    cond.grad = None
    monkeypatch.setattr(objectives, "LOSS_CHUNK_ELEMENTS", 25)  # two positions a block
    blocks = objectives.mdu_forget_loss(cond, anchor, masked, tau=2.0, eta=0.5, direction="reverse")
    blocks.backward()
    want = _reference_forget_loss(cond.detach().numpy(), anchor.numpy(), masked.numpy(), 2.0, 0.5, "reverse")
    assert blocks.item() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(cond.grad, whole_grad, atol=1e-7)


def test_npo_scores_with_cart_weights_for_dream():
    """Dream's NPO scores weight each masked position by CART, as its retain loss does."""
    from mdu_cli.methods.objectives import sequence_log_likelihood

    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 6, 5, generator=gen)
    targets = torch.randint(0, 5, (2, 6), generator=gen)
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    masked = response & torch.tensor([[1, 0, 1, 0, 1, 1], [0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    got = sequence_log_likelihood(logits, _batch(targets, masked, response, torch.tensor([0.5, 0.5]), attention), "cart")
    weights = np.array([_reference_cart(masked[r].tolist(), attention[r].tolist()) for r in range(2)])
    want = _reference_sequence_ll(logits.numpy(), targets.numpy(), masked.numpy(), None, response.numpy(), weights)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
