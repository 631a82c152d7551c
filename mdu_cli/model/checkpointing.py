"""Gradient (activation) checkpointing for every family.

Models whose class supports it (transformers-native ones, Dream) use
transformers' own switch. Remote code that does not (LLaDA's class never
declares it) gets the same effect here: each transformer block's forward is
wrapped in `torch.utils.checkpoint`, so its activations are recomputed in
backward instead of being kept.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from mdu_cli.errors import MduError
from mdu_cli.model.block_names import BLOCK_LIST_NAMES


def transformer_blocks(model, needed_for: str = "--gradient-checkpointing") -> torch.nn.ModuleList:
    """The longest ModuleList named like a stack of transformer blocks."""
    candidates = [module for name, module in model.named_modules()
                  if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in BLOCK_LIST_NAMES]
    if not candidates:
        raise MduError(f"cannot find the transformer blocks of this model for {needed_for}; leave it out")
    return max(candidates, key=len)


def _checkpointed(original, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)  # no-grad passes (the anchor) have nothing to save


def enable_gradient_checkpointing(model) -> str:
    """Switch checkpointing on; returns how ("transformers" or "blocks")."""
    if getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "transformers"
    for block in transformer_blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)
    return "blocks"
