"""The unlearning methods: what the frozen anchor sees, what of its output the
loss keeps (so the full-vocabulary anchor logits can be freed before the
trainable model's forward), and which forget loss is minimised. Each is a small unit; the training loop asks the method, never
branches on its name.

- mdu: the anchor sees the noised sequence with the prompt masked; forward KL
  (or reverse, JS) toward tau-scaled anchor logits (docs/method.md section 2).
- ga:  no anchor; gradient ascent on the MDLM loss of the forget rows.
- npo: the anchor sees the same noised sequence; NPO on MDLM sequence scores.
- finetune: no anchor; the MDLM fine-tuning loss itself (`mdu finetune`, which
  builds TOFU's target and retain-only reference models by the same loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mdu_cli.config.training import UnlearnConfig
from mdu_cli.model.families import Family
from mdu_cli.train.masking import NoisedBatch, anchor_input_ids
from mdu_cli.train.objectives import (gradient_ascent_loss, mdlm_loss, mdu_forget_loss, npo_loss,
                                sequence_log_likelihood)

@dataclass(frozen=True)
class MDU:
    tau: float
    eta: float
    direction: str
    needs_anchor: bool = True

    def anchor_input(self, noised: NoisedBatch, mask_token_id: int) -> Optional[torch.Tensor]:
        return anchor_input_ids(noised, mask_token_id)

    def anchor_view(self, anchor_logits: torch.Tensor, noised: NoisedBatch, family: Family) -> torch.Tensor:
        return anchor_logits[noised.masked]  # (N, vocab): all the loss reads

    def loss(self, logits, anchor_view, noised: NoisedBatch, family: Family) -> torch.Tensor:
        return mdu_forget_loss(logits, anchor_view, noised.masked, self.tau, self.eta, self.direction)


@dataclass(frozen=True)
class _NoAnchor:
    """A method whose loss reads the trainable model alone."""

    needs_anchor: bool = False

    def anchor_input(self, noised: NoisedBatch, mask_token_id: int) -> Optional[torch.Tensor]:
        return None

    def anchor_view(self, anchor_logits: torch.Tensor, noised: NoisedBatch, family: Family) -> None:
        return None


@dataclass(frozen=True)
class GradientAscent(_NoAnchor):
    def loss(self, logits, anchor_view, noised: NoisedBatch, family: Family) -> torch.Tensor:
        return gradient_ascent_loss(logits, noised.targets, noised.masked, noised.response_mask, noised.mask_prob,
                                    family.retain_weighting, noised.attention_mask)


@dataclass(frozen=True)
class NPO:
    beta: float
    needs_anchor: bool = True

    def anchor_input(self, noised: NoisedBatch, mask_token_id: int) -> Optional[torch.Tensor]:
        return noised.input_ids  # the reference model scores the very same masked input

    def anchor_view(self, anchor_logits: torch.Tensor, noised: NoisedBatch, family: Family) -> torch.Tensor:
        return _scores(anchor_logits, noised, family.retain_weighting)  # (batch,)

    def loss(self, logits, anchor_view, noised: NoisedBatch, family: Family) -> torch.Tensor:
        return npo_loss(_scores(logits, noised, family.retain_weighting), anchor_view, self.beta)


def _scores(logits: torch.Tensor, noised: NoisedBatch, weighting: str) -> torch.Tensor:
    return sequence_log_likelihood(logits, noised.targets, noised.masked, noised.mask_prob, noised.response_mask,
                                   weighting, noised.attention_mask)


@dataclass(frozen=True)
class FineTune(_NoAnchor):
    """Plain MDLM fine-tuning: 1/t-weighted (CART for Dream) cross-entropy of
    the masked answer tokens, minimised; the rows are the training records."""

    def loss(self, logits, anchor_view, noised: NoisedBatch, family: Family) -> torch.Tensor:
        return mdlm_loss(logits, noised.targets, noised.masked, noised.response_mask, noised.mask_prob,
                         family.retain_weighting, noised.attention_mask)


def make_method(cfg: UnlearnConfig):
    if cfg.method == "mdu":
        return MDU(cfg.tau, cfg.eta, cfg.kl)
    if cfg.method == "ga":
        return GradientAscent()
    if cfg.method == "npo":
        return NPO(cfg.npo_beta)
    if cfg.method == "finetune":
        return FineTune()
    raise ValueError(f"unknown method {cfg.method!r}")
