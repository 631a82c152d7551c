"""Masked Diffusion Unlearning (docs/method.md section 2): the anchor sees the
noised sequence with the prompt masked; the loss is the divergence (forward
KL, or reverse, JS) from the model's prediction to the tau-scaled anchor's at
every masked answer position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from mdu_cli.methods.base import Method

if TYPE_CHECKING:
    import torch

    from mdu_cli.methods.masking import NoisedBatch
    from mdu_cli.model.families import Family


@dataclass(frozen=True)
class MDU:
    tau: float
    eta: float
    direction: str
    needs_anchor: bool = True

    def anchor_input(self, noised: NoisedBatch, mask_token_id: int) -> Optional[torch.Tensor]:
        from mdu_cli.methods.masking import anchor_input_ids

        return anchor_input_ids(noised, mask_token_id)

    def anchor_view(self, anchor_logits: torch.Tensor, noised: NoisedBatch, family: Family) -> torch.Tensor:
        return anchor_logits[noised.masked]  # (N, vocab): all the loss reads

    def loss(self, logits, anchor_view, noised: NoisedBatch, family: Family) -> torch.Tensor:
        from mdu_cli.methods.objectives import mdu_forget_loss

        return mdu_forget_loss(logits, anchor_view, noised.masked, self.tau, self.eta, self.direction)


_DIVERGENCES = {"forward": "forward KL(p_model ‖ p_target)", "reverse": "reverse KL(p_target ‖ p_model)",
                "js": "Jensen-Shannon divergence"}


def _objective(config: Mapping) -> str:
    return f"MDU: {_DIVERGENCES[config['kl']]} to the anchor, tau = {config['tau']}, eta = {config['eta']}"


METHOD = Method(
    name="mdu",
    summary="mdu",
    options=("tau", "eta", "kl"),
    build=lambda cfg: MDU(cfg.tau, cfg.eta, cfg.kl),
    objective=_objective,
    description=("**Masked Diffusion Unlearning** (MDU)", "at every masked response position of the forget records, "
                 "the model's prompt-conditional prediction was pulled toward the frozen starting model's prediction "
                 "with the prompt masked out."),
    settings=lambda config: f"mdu-tau{config['tau']:g}",
)
