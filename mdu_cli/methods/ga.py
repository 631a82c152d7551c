"""Gradient ascent, a baseline: no anchor; the MDLM loss of the forget rows, maximised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from mdu_cli.methods.base import Method

if TYPE_CHECKING:
    import torch

    from mdu_cli.methods.masking import NoisedBatch
    from mdu_cli.model.families import Family


@dataclass(frozen=True)
class NoAnchor:
    """A loss that reads the trainable model alone."""

    needs_anchor: bool = False

    def anchor_input(self, noised: NoisedBatch, mask_token_id: int) -> Optional[torch.Tensor]:
        return None

    def anchor_view(self, anchor_logits: torch.Tensor, noised: NoisedBatch, family: Family) -> None:
        return None


@dataclass(frozen=True)
class GradientAscent(NoAnchor):
    def loss(self, logits, anchor_view, noised: NoisedBatch, family: Family) -> torch.Tensor:
        from mdu_cli.methods.objectives import gradient_ascent_loss

        return gradient_ascent_loss(logits, noised, family.retain_weighting)


METHOD = Method(
    name="ga",
    summary="ga (gradient ascent)",
    options=(),
    build=lambda cfg: GradientAscent(),
    objective=lambda config: "gradient ascent on the MDLM loss (GA, a baseline)",
    description=("gradient ascent (GA, a baseline)", "the MDLM loss of the forget answers was maximised."),
    settings=lambda config: "ga",
)
