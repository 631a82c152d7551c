"""The model families mdu knows, and how to tell them apart (docs/method.md section 3).

Everything that differs between LLaDA, Dream and a native masked-LM lives
here: how the family is recognised from `config.json`, where the mask token id
comes from, whether logits are right-shifted, and how the retain loss weights
masked positions. The rest of the code asks a `Family`, never a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mdu_cli.errors import MduError


@dataclass(frozen=True)
class Family:
    name: str
    # Dream reads token i from the logits at position i-1 (it was adapted from
    # an autoregressive Qwen and kept its next-token head).
    shifted_logits: bool
    # Dream trains with context-adaptive reweighting (CART) instead of 1/t.
    retain_weighting: str  # "inverse_t" | "cart"
    # Tokens tried, in order, when neither the config nor the tokenizer names a
    # mask token (the hub LLaDA tokenizer does not declare `<|mdm_mask|>`).
    mask_token_candidates: tuple[str, ...]
    # Dream's attention hands `attention_mask` straight to SDPA, so it takes a
    # (batch, 1, seq, seq) boolean mask, as its own sampler builds; the others
    # take the usual (batch, seq) padding mask.
    attention_mask_4d: bool = False


FAMILIES = {
    "llada": Family("llada", False, "inverse_t", ("<|mdm_mask|>",)),
    "dream": Family("dream", True, "cart", ("<|mask|>",), attention_mask_4d=True),
    "masked-lm": Family("masked-lm", False, "inverse_t", ("[MASK]", "<mask>", "<|mask|>")),
}

_AUTOREGRESSIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _architectures(config: dict) -> list[str]:
    """config.json's architectures as a list of names (a damaged file may hold anything)."""
    value = config.get("architectures")
    return [str(a) for a in value] if isinstance(value, list) else []


def detect_family(config: dict, source: str) -> Family:
    """Recognise the family from a parsed `config.json`.

    Refuses autoregressive LMs: MDU needs a model that predicts masked tokens
    from both sides.
    """
    model_type = str(config.get("model_type", "")).lower()
    architectures = _architectures(config)
    if "llada" in model_type or any("llada" in a.lower() for a in architectures):
        return FAMILIES["llada"]
    if "dream" in model_type or any("dream" in a.lower() for a in architectures):
        return FAMILIES["dream"]
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return FAMILIES["masked-lm"]
    if architectures and all(a.endswith(_AUTOREGRESSIVE_SUFFIXES) for a in architectures):
        raise autoregressive_error(source, architectures)
    raise MduError(
        f"{source}: cannot tell the model family from config.json "
        f"(model_type={model_type or '?'}, architectures={architectures or '?'}); "
        "pass --family llada|dream|masked-lm"
    )


def autoregressive_error(source: str, architectures: list[str]) -> MduError:
    return MduError(
        f"{source} is an autoregressive language model ({', '.join(architectures)}); "
        "mdu unlearns masked diffusion LMs (LLaDA, Dream, masked-LMs with a mask token)"
    )


def check_not_autoregressive(config: dict, source: str) -> None:
    """Refuse an autoregressive checkpoint even when --family was forced: its
    causal attention cannot see the response it would be asked to fill in."""
    architectures = _architectures(config)
    if config.get("auto_map"):
        return  # LLaDA maps AutoModelForCausalLM to its own bidirectional class
    if architectures and all(a.endswith(_AUTOREGRESSIVE_SUFFIXES) for a in architectures):
        raise autoregressive_error(source, architectures)


def choose_family(config: dict, source: str, forced: Optional[str] = None) -> Family:
    """--family when given (an autoregressive checkpoint still refused), else
    the family the checkpoint's config.json says."""
    if forced:
        check_not_autoregressive(config, source)
        return FAMILIES[forced]
    return detect_family(config, source)


def resolve_mask_token_id(family: Family, config: dict, tokenizer, source: str) -> int:
    """The id of the mask token, from the config, the tokenizer or a known token."""
    for candidate in (config.get("mask_token_id"), getattr(tokenizer, "mask_token_id", None)):
        if isinstance(candidate, int) and candidate >= 0:
            return candidate
    vocab = tokenizer.get_vocab()
    for token in family.mask_token_candidates:
        if token in vocab:
            return int(vocab[token])
    raise MduError(
        f"{source}: no mask token (config.json has no mask_token_id, the tokenizer declares no "
        f"mask_token and has none of {', '.join(family.mask_token_candidates)}); "
        "mdu needs a masked diffusion LM, or pass the right --family"
    )


def forward_attention_mask(attention_mask: torch.Tensor, family: Family):
    """The attention mask in the form the family's forward expects.

    attention_mask: (batch, seq), 1 at tokens and 0 at padding. For Dream:
    None when nothing is padded (its "full" attention), else a (batch, 1, seq,
    seq) boolean mask that hides padded keys from every query.
    """
    if not family.attention_mask_4d:
        return attention_mask
    if bool(attention_mask.all()):
        return None
    keys = attention_mask.bool()[:, None, None, :]
    return keys.expand(-1, 1, attention_mask.shape[1], -1)


def align_logits(logits: torch.Tensor, family: Family) -> torch.Tensor:
    """Logits such that position i scores token i.

    logits: (batch, seq, vocab). For Dream the prediction of token i sits at
    position i-1; position 0 has no predecessor and keeps its own logits, which
    only ever meet a prompt token (never scored).
    """
    if not family.shifted_logits:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, family: Family) -> torch.Tensor:
    """(batch, seq, vocab) logits aligned so that position i scores token i."""
    output = model(input_ids=input_ids, attention_mask=forward_attention_mask(attention_mask, family))
    logits = output.logits if hasattr(output, "logits") else output[0]
    return align_logits(logits, family)
