"""Loading a checkpoint to score or generate with (`mdu eval`, `mdu generate`).

The same checks as `mdu unlearn` apply: remote-code policy, family, mask
token; weights are safetensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from mdu_cli.data.tokenization import encode_prompt, end_of_turn_id, pad_token_id
from mdu_cli.errors import MduError
from mdu_cli.model.families import Family, choose_family, resolve_mask_token_id
from mdu_cli.model.loading import (
    ModelSource,
    decide_remote_code,
    fetch_weights,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_device,
    resolve_source,
)


@dataclass
class LoadedModel:
    model: Any                # None until load_weights(): every cheap check comes first
    tokenizer: Any
    family: Family
    mask_token_id: int
    source: ModelSource
    device: torch.device
    trust: bool = False
    positions: Optional[int] = None   # the longest sequence the model takes, when its config says

    def load_weights(self) -> "LoadedModel":
        if self.model is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            fetch_weights(self.source)
            self.model = load_model(self.source, self.trust, dtype).to(self.device).eval()
        return self

    def check_length(self, tokens: int, where: str, what: str, fix: str = "shorten it") -> None:
        """Refuse a sequence the model has no positions for: it would not fail,
        it would silently compute garbage."""
        if self.positions is not None and tokens > self.positions:
            raise MduError(f"{where}: {what} is {tokens} tokens, more than the {self.positions} positions "
                           f"{self.source.name} takes; {fix}")

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, end_of_turn_id(self.tokenizer)}
        return sorted(i for i in ids if i is not None)

    def prompt_ids(self, messages: list[dict], where: str = "") -> list[int]:
        return encode_prompt(self.tokenizer, messages, where=where)


def load_for_inference(name: str, revision: Optional[str] = None, family: Optional[str] = None,
                       trust_remote_code: bool = False, device: str = "auto",
                       chat_template: Optional[str] = None) -> LoadedModel:
    return prepare_inference(name, revision, family, trust_remote_code, device, chat_template).load_weights()


def prepare_inference(name: str, revision: Optional[str] = None, family: Optional[str] = None,
                      trust_remote_code: bool = False, device: str = "auto",
                      chat_template: Optional[str] = None) -> LoadedModel:
    """Everything but the weights: config, family, remote-code policy,
    tokenizer, mask token, device."""
    source = resolve_source(name, revision)
    chosen = choose_family(source.config, source.name, family)
    trust = decide_remote_code(source, trust_remote_code)
    tokenizer = load_tokenizer(source, trust, chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise MduError(f"{name}: the tokenizer has no chat template; put the Jinja template the model was trained "
                       "with into the model directory as chat_template.jinja (an output of `mdu unlearn "
                       "--chat-template` carries its own)")
    mask_token_id = resolve_mask_token_id(chosen, source.config, tokenizer, source.name)
    device = resolve_device(device)
    return LoadedModel(None, tokenizer, chosen, mask_token_id, source, torch.device(device), trust,
                       max_positions(source.config))
