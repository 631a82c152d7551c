"""Loss functions: the MDU forget objective and the MDLM retain loss.

Both take logits already aligned by `model.families.align_logits` (position i scores
token i) and are computed in fp32 whatever the model's dtype, since a bf16
softmax over a 126k vocabulary loses the small probabilities KL depends on.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from mdu_cli.methods.masking import NoisedBatch

LOSS_CHUNK_ELEMENTS = 1 << 22  # positions x vocabulary per block of the forget loss (16 MB in fp32)
CART_P = 0.3


def mdu_target_logits(conditional: torch.Tensor, anchor: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
    """l_* = tau * (l_u - eta * (l_c - l_u)), detached (MDU, arXiv 2605.18253, section 3).

    conditional, anchor: (N, vocab) logits at masked response positions.
    """
    conditional, anchor = conditional.detach(), anchor.detach()
    return tau * (anchor - eta * (conditional - anchor))


def divergence(conditional: torch.Tensor, target: torch.Tensor, direction: str) -> torch.Tensor:
    """Per-position divergence between softmax(conditional) = p_c and
    softmax(target) = p_*; (N, vocab) logits in, (N,) losses out.

    forward: KL(p_c || p_*); reverse: KL(p_* || p_c); js: Jensen-Shannon.
    """
    log_p = F.log_softmax(conditional.float(), dim=-1)
    log_q = F.log_softmax(target.float(), dim=-1)
    if direction == "forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if direction == "reverse":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if direction == "js":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    raise ValueError(f"unknown KL direction {direction!r}; expected forward, reverse or js")


def mdu_forget_loss(
    conditional_logits: torch.Tensor,
    anchor_logits: torch.Tensor,
    masked: torch.Tensor,
    tau: float,
    eta: float = 0.0,
    direction: str = "forward",
) -> torch.Tensor:
    """L_forget: the mean divergence over all masked response positions of the batch.

    conditional_logits: (batch, seq, vocab), with gradient, on [P | x_t]
    anchor_logits:      (batch, seq, vocab), frozen model on [MASK..MASK | x_t],
                        or already gathered at the masked positions, (N, vocab)
    masked:             (batch, seq) bool, the set M
    No 1/t weight (docs/method.md section 2, step 6).
    """
    conditional = conditional_logits[masked]
    anchor = anchor_logits[masked] if anchor_logits.dim() == 3 else anchor_logits
    rows = conditional.shape[0]
    if rows == 0:
        return conditional.sum() * 0.0
    # A block of positions at a time, recomputed in backward: autograd would
    # otherwise keep several fp32 (positions x vocabulary) intermediates of the
    # softmaxes alive until backward, more than the model's own activations.
    step = max(1, LOSS_CHUNK_ELEMENTS // conditional.shape[1])
    total = conditional.new_zeros((), dtype=torch.float32)
    for first in range(0, rows, step):
        args = (conditional[first:first + step], anchor[first:first + step], tau, eta, direction)
        if torch.is_grad_enabled() and conditional.requires_grad:
            total = total + checkpoint(_divergence_sum, *args, use_reentrant=False)
        else:
            total = total + _divergence_sum(*args)
    return total / rows


def _divergence_sum(conditional: torch.Tensor, anchor: torch.Tensor, tau: float, eta: float,
                    direction: str) -> torch.Tensor:
    conditional = conditional.float()
    target = mdu_target_logits(conditional, anchor.float(), tau, eta)
    return divergence(conditional, target, direction).sum()


def cart_weights(masked: torch.Tensor, attention_mask: torch.Tensor, p: float = CART_P) -> torch.Tensor:
    """Dream's context-adaptive reweighting: position i gets
    sum over unmasked, non-padding j != i of 0.5 * p * (1 - p) ** (|i - j| - 1).

    masked, attention_mask: (batch, seq). Returns (batch, seq) float weights.
    """
    width = masked.shape[1]
    positions = torch.arange(width, device=masked.device)
    distance = (positions[:, None] - positions[None, :]).abs()
    kernel = 0.5 * p * (1 - p) ** (distance.float() - 1)
    kernel.fill_diagonal_(0.0)
    context = (attention_mask.bool() & ~masked).float()
    return context @ kernel.T


def position_weights(
    masked: torch.Tensor,
    mask_prob: torch.Tensor,
    weighting: str = "inverse_t",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight of each masked position in the MDLM likelihood bound, (batch, seq):
    1 / mask_prob of the row ("inverse_t": 1/t, made unbiased for the forced
    mask, see `masking.inclusion_probability`) or Dream's CART weights ("cart")."""
    if weighting == "inverse_t":
        return (1.0 / mask_prob.float())[:, None].expand(masked.shape)
    if weighting == "cart":
        return cart_weights(masked, attention_mask if attention_mask is not None else torch.ones_like(masked))
    raise ValueError(f"unknown weighting {weighting!r}")


def mdlm_loss(logits: torch.Tensor, noised: NoisedBatch, weighting: str = "inverse_t") -> torch.Tensor:
    """The MDLM fine-tuning loss (LLaDA SFT): cross-entropy of the clean token at
    each masked response position, weighted by 1/t (or CART for Dream), summed
    and divided by the number of response tokens in the batch.

    logits: (batch, seq, vocab); `noised` gives the targets, the masked set,
    the response positions, each row's mask probability (`mask_prob`, t itself
    where no mask is ever forced) and the attention mask (for CART).
    """
    masked = noised.masked
    ce = F.cross_entropy(logits[masked].float(), noised.targets[masked], reduction="none")
    weights = position_weights(masked, noised.mask_prob, weighting, noised.attention_mask)[masked]
    return (ce * weights).sum() / noised.response_mask.sum().clamp(min=1)


def sequence_log_likelihood(logits: torch.Tensor, noised: NoisedBatch, weighting: str = "inverse_t") -> torch.Tensor:
    """Per-row, token-normalised MDLM bound on log p(response | prompt): the
    weighted sum over masked positions of log p(clean token), divided by the
    row's number of response tokens. (batch,) out.

    logits: (batch, seq, vocab); `noised` as for `mdlm_loss`. This is the
    sequence score NPO compares between the model and its anchor; per token,
    so that long and short answers weigh alike.
    """
    masked = noised.masked
    # Only masked positions count: a softmax over the whole (batch, seq, vocab)
    # would cost a full fp32 copy of the logits for nothing.
    targets = noised.targets[masked].unsqueeze(-1)
    log_probs = F.log_softmax(logits[masked].float(), dim=-1).gather(-1, targets).squeeze(-1)
    weighted = log_probs * position_weights(masked, noised.mask_prob, weighting, noised.attention_mask)[masked].float()
    rows = masked.nonzero()[:, 0]
    per_row = torch.zeros(masked.shape[0], dtype=log_probs.dtype, device=log_probs.device).index_add(0, rows, weighted)
    return per_row / noised.response_mask.sum(1).clamp(min=1).to(per_row.dtype)


def gradient_ascent_loss(logits: torch.Tensor, noised: NoisedBatch, weighting: str = "inverse_t") -> torch.Tensor:
    """GA baseline: the negated MDLM loss of the forget rows (minimising it
    ascends the likelihood loss). Same arguments as `mdlm_loss`."""
    return -mdlm_loss(logits, noised, weighting)


def npo_loss(model_scores: torch.Tensor, reference_scores: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al., 2024, arXiv 2404.05868):
    (2 / beta) * mean softplus(beta * (s_theta - s_ref)), i.e.
    -(2 / beta) * mean log sigmoid(-beta * log(pi_theta / pi_ref)).

    model_scores, reference_scores: (batch,) `sequence_log_likelihood` of the
    model and of the frozen anchor on the same masked input. The scores are per
    token, so beta here equals beta x answer length of an implementation that
    sums log-likelihoods over the answer.
    """
    ratio = model_scores.float() - reference_scores.detach().float()
    return (2.0 / beta) * F.softplus(beta * ratio).mean()
