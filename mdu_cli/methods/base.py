"""What the registry knows of a method, and the protocol of its loss.

A method module is torch-free when imported, so that `mdu --help` can list the
methods: the loss object it builds imports the tensor code (`objectives`,
`masking`) when a run first calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol

if TYPE_CHECKING:
    import torch

    from mdu_cli.methods.masking import NoisedBatch
    from mdu_cli.model.families import Family


class Loss(Protocol):
    """What the training loop asks of a method, per forget micro-batch: the
    anchor's input (None: no anchor), what of the anchor's logits the loss
    keeps (so the full-vocabulary logits can be freed before the trainable
    model's forward), and the loss itself."""

    needs_anchor: bool

    def anchor_input(self, noised: NoisedBatch, mask_token_id: int) -> Optional[torch.Tensor]: ...

    def anchor_view(self, anchor_logits: torch.Tensor, noised: NoisedBatch, family: Family) -> Any: ...

    def loss(self, logits: torch.Tensor, anchor_view: Any, noised: NoisedBatch, family: Family) -> torch.Tensor: ...


@dataclass(frozen=True)
class Method:
    """One entry of `METHODS`. The callables that describe a run read its
    recorded options (`mdu_run.json`'s "config"), so a card can be rendered
    again from the record alone."""

    name: str
    summary: str                              # a few words, for --method's help
    options: tuple[str, ...]                  # the config fields it reads beyond the shared ones
    build: Callable[[Any], Loss]              # the run's config -> its loss
    objective: Callable[[Mapping], str]       # the card's "objective" row
    description: tuple[str, str]              # the card: what was run, what it did to the forget records
    settings: Callable[[Mapping], str]        # the knobs in a few characters: `<model>-<settings>`, commit messages
    unlearns: bool = True                     # False: fine-tuning, described without a forget set
