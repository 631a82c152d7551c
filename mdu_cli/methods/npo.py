"""Negative preference optimisation, a baseline: the anchor scores the very
same noised input; NPO's bounded loss on per-token MDLM sequence scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from mdu_cli.methods.base import Method

if TYPE_CHECKING:
    import torch

    from mdu_cli.methods.masking import NoisedBatch
    from mdu_cli.model.families import Family


@dataclass(frozen=True)
class NPO:
    beta: float
    needs_anchor: bool = True

    def anchor_input(self, noised: NoisedBatch, mask_token_id: int) -> Optional[torch.Tensor]:
        return noised.input_ids  # the reference model scores the very same masked input

    def anchor_view(self, anchor_logits: torch.Tensor, noised: NoisedBatch, family: Family) -> torch.Tensor:
        return _scores(anchor_logits, noised, family.retain_weighting)  # (batch,)

    def loss(self, logits, anchor_view, noised: NoisedBatch, family: Family) -> torch.Tensor:
        from mdu_cli.methods.objectives import npo_loss

        return npo_loss(_scores(logits, noised, family.retain_weighting), anchor_view, self.beta)


def _scores(logits: torch.Tensor, noised: NoisedBatch, weighting: str) -> torch.Tensor:
    from mdu_cli.methods.objectives import sequence_log_likelihood

    return sequence_log_likelihood(logits, noised, weighting)


METHOD = Method(
    name="npo",
    summary="npo (negative preference optimisation)",
    options=("npo_beta",),
    build=lambda cfg: NPO(cfg.npo_beta),
    objective=lambda config: f"NPO baseline, beta = {config.get('npo_beta')}, against the starting model",
    description=("negative preference optimisation (NPO, a baseline)",
                 "the likelihood of the forget answers was pushed below the starting model's, with a bounded loss."),
    settings=lambda config: f"npo-beta{config['npo_beta']:g}",
)
