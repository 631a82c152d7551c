"""The objective of `mdu finetune`, which is not an unlearning method but shares
the loop: 1/t-weighted (CART for Dream) cross-entropy of the masked answer
tokens, minimised, with no anchor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mdu_cli.methods.base import Method
from mdu_cli.methods.ga import NoAnchor

if TYPE_CHECKING:
    import torch

    from mdu_cli.methods.masking import NoisedBatch
    from mdu_cli.model.families import Family


@dataclass(frozen=True)
class FineTune(NoAnchor):
    def loss(self, logits, anchor_view, noised: NoisedBatch, family: Family) -> torch.Tensor:
        from mdu_cli.methods.objectives import mdlm_loss

        return mdlm_loss(logits, noised, family.retain_weighting)


# How cards and commit messages describe a fine-tuning run (not an entry of
# METHODS: `mdu unlearn --method` does not offer it).
METHOD = Method(
    name="finetune",
    summary="MDLM fine-tuning",
    options=(),
    build=lambda cfg: FineTune(),
    objective=lambda config: "MDLM fine-tuning (1/t-weighted masked cross-entropy; CART for Dream)",
    description=("MDLM fine-tuning", "the masked-token loss of the training records was minimised."),
    settings=lambda config: "finetuned",
    unlearns=False,
)
