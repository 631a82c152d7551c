"""LoRA for `mdu unlearn --lora`, with the adapter-off anchor.

With LoRA the starting model theta_0 is the same base weights with the adapter
switched off, so MDU's anchor needs no second copy of the model (docs/method.md
section 2): `AdapterOffAnchor` runs the trained model under
`disable_adapter()`. Adapters go only on linear layers inside the transformer
blocks, which keeps LLaDA's head (also named `ff_out`) out by construction.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from mdu_cli.errors import MduError
from mdu_cli.model.block_names import BLOCK_LIST_PATTERN
from mdu_cli.model.checkpointing import transformer_blocks


def default_targets(model) -> list[str]:
    """Names of every linear layer inside the transformer blocks: LLaDA's
    q/k/v_proj, attn_out, ff_proj, up_proj, ff_out; Dream's q/k/v/o_proj,
    gate/up/down_proj; a masked-LM's own names."""
    names = {name.split(".")[-1] for name, module in transformer_blocks(model).named_modules()
             if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def target_regex(names: list[str]) -> str:
    """A PEFT target_modules pattern matching those names inside a block only."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf".*\.(?:{BLOCK_LIST_PATTERN})\.\d+\.(?:.*\.)?(?:{alternatives})$"


def check_targets(targets: Optional[str], tensor_names) -> None:
    """Refuse --lora-targets that name no linear layer inside the blocks, from
    the checkpoint's tensor names alone: before the weights load."""
    if not targets:
        return
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise MduError("--lora-targets is empty; name linear layers inside the blocks (e.g. q_proj,v_proj)")
    in_blocks = re.compile(rf"(?:^|\.)(?:{BLOCK_LIST_PATTERN})\.\d+\.(?:.*\.)?(?P<leaf>[^.]+)\.weight$")
    leaves = {match["leaf"] for match in map(in_blocks.search, tensor_names) if match}
    unknown = [name for name in names if name not in leaves]
    if unknown:
        raise MduError(f"--lora-targets {','.join(unknown)}: no such layer inside the blocks of this model; "
                       f"it has {', '.join(sorted(leaves)[:12])}")


def apply_lora(model, r: int, alpha: float, dropout: float, targets: Optional[str] = None):
    from peft import LoraConfig, get_peft_model

    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else default_targets(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(names))
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise MduError(f"--lora-targets {','.join(names)}: {err}; name linear layers inside the blocks") from None


class AdapterOffAnchor(torch.nn.Module):
    """The frozen starting model, as the trained model with its adapter off."""

    def __init__(self, peft_model):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: no parameters of its own
        # peft's disable_adapter() also switches the adapter's requires_grad off
        # and on again; under FSDP2 that flip, after wrapping, leaves the
        # gathered adapter weights without gradients. The layers' own switch
        # is what their forward reads, so only it is flipped. FSDP wraps these
        # same module objects in place, so the list stays valid.
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        if not all(hasattr(layer, "_disable_adapters") for layer in layers):  # a private switch: check it is there
            import peft

            raise MduError(f"peft {peft.__version__}: its LoRA layers lack the _disable_adapters switch that the "
                           "adapter-off anchor uses; install peft 0.13 to 0.21")
        object.__setattr__(self, "layers", layers)

    def forward(self, **inputs):
        saved = [layer._disable_adapters for layer in self.layers]
        try:
            for layer in self.layers:
                layer._disable_adapters = True
            with torch.no_grad():
                return self.peft_model(**inputs)
        finally:
            for layer, value in zip(self.layers, saved):
                layer._disable_adapters = value
