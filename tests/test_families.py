"""Family detection, mask-token resolution and Dream's logit alignment."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from mdu_cli.errors import MduError
from mdu_cli.methods.objectives import mdu_forget_loss
from mdu_cli.model.families import (
    FAMILIES,
    align_logits,
    check_not_autoregressive,
    detect_family,
    resolve_mask_token_id,
)


def _config(directory):
    return json.loads((directory / "config.json").read_text())


def test_detects_each_fixture_family(llada_dir, dream_dir, masked_lm_dir):
    assert detect_family(_config(llada_dir), "x").name == "llada"
    assert detect_family(_config(dream_dir), "x").name == "dream"
    assert detect_family(_config(masked_lm_dir), "x").name == "masked-lm"


def test_real_hub_config_shapes_are_recognised():
    assert detect_family({"model_type": "llada", "architectures": ["LLaDAModelLM"]}, "x").name == "llada"
    assert detect_family({"model_type": "Dream", "architectures": ["DreamModel"]}, "x").name == "dream"
    assert detect_family({"model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"]}, "x").name == "masked-lm"


def test_autoregressive_model_is_refused(causal_lm_dir):
    with pytest.raises(MduError, match="autoregressive"):
        detect_family(_config(causal_lm_dir), "tiny-llama")
    with pytest.raises(MduError, match="autoregressive"):
        check_not_autoregressive(_config(causal_lm_dir), "tiny-llama")


def test_unknown_family_asks_for_flag():
    with pytest.raises(MduError, match="--family"):
        detect_family({"model_type": "mystery", "architectures": ["MysteryModel"]}, "x")


def test_llada_mask_id_from_config_even_though_tokenizer_declares_none(llada_dir):
    tokenizer = AutoTokenizer.from_pretrained(llada_dir)
    assert tokenizer.mask_token_id is None
    config = _config(llada_dir)
    want = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert resolve_mask_token_id(FAMILIES["llada"], config, tokenizer, "x") == want


def test_llada_mask_id_found_by_token_when_config_lacks_it(llada_dir):
    tokenizer = AutoTokenizer.from_pretrained(llada_dir)
    config = {k: v for k, v in _config(llada_dir).items() if k != "mask_token_id"}
    want = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert resolve_mask_token_id(FAMILIES["llada"], config, tokenizer, "x") == want


def test_masked_lm_mask_id_from_tokenizer(masked_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(masked_lm_dir)
    got = resolve_mask_token_id(FAMILIES["masked-lm"], _config(masked_lm_dir), tokenizer, "x")
    assert got == tokenizer.mask_token_id == tokenizer.convert_tokens_to_ids("[MASK]")


def test_no_mask_token_is_refused(causal_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_dir)
    with pytest.raises(MduError, match="no mask token"):
        resolve_mask_token_id(FAMILIES["masked-lm"], _config(causal_lm_dir), tokenizer, "tiny-llama")


def test_dream_alignment_reads_token_i_from_position_i_minus_1():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    aligned = align_logits(logits, FAMILIES["dream"])
    for i in range(1, 5):
        assert torch.equal(aligned[:, i], logits[:, i - 1])
    assert torch.equal(align_logits(logits, FAMILIES["llada"]), logits)


def test_dream_loss_uses_the_previous_position():
    """Only the raw logits at position i-1 may influence the loss at masked position i."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 6, 8, generator=gen, requires_grad=True)
    anchor = torch.randn(1, 6, 8, generator=gen)
    masked = torch.zeros(1, 6, dtype=torch.bool)
    masked[0, 4] = True
    family = FAMILIES["dream"]
    loss = mdu_forget_loss(align_logits(raw, family), align_logits(anchor, family), masked, tau=1.0)
    loss.backward()
    touched = raw.grad.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert touched == [3]
