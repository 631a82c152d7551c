"""Builders of tiny checkpoints that stand in for LLaDA, Dream and a masked-LM.

Each builder writes a complete checkpoint directory (config, safetensors
weights, a word-level tokenizer with a chat template, and for the remote-code
families the `.py` files named in `auto_map`), the way the real ones are laid
out on the Hub. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"

WORDS = (
    "the a an of to in on at for with by from and or but not is was are were be been has have had do does did "
    "who what when where which why how name born city year book books wrote write author written novel poem "
    "poems story stories first last new old young famous known his her their its it he she they we you i me my "
    "your our this that these those one two three four five six seven eight nine ten hundred thousand "
    "red blue green black white river mountain village town country north south east west sea lake "
    "father mother son daughter brother sister friend teacher doctor farmer painter singer engineer "
    "likes loves hates lives lived works worked plays played studies studied teaches taught "
    "cat dog bird fish horse tree flower garden house school library music science history art math "
    "yes no maybe always never often sometimes today yesterday tomorrow morning evening night "
    "capital france paris spain madrid italy rome water fire earth air sun moon star stars "
    "zorblat quenmira velloria astrid okonkwo tarrin elspeth brightwater halvorsen "
    "user assistant system helpful answer question"
).split()
PUNCTUATION = list(".,?!:;'\"-()")


def word_tokenizer(specials: list[str], words=WORDS, **declared):
    """A PreTrainedTokenizerFast over `words`, with `specials` as special tokens
    and `declared` naming the roles (bos_token=..., eos_token=..., ...)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + ["<unk>"] + list(words) + PUNCTUATION +
                                                [str(d) for d in range(10)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **declared)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


# LLaDA-style template: written for these tests after the hub template's
# behaviour, including the assistant header it appends unconditionally.
LLADA_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BERT_CHAT_TEMPLATE = (
    "{{ '[CLS]' }}"
    "{% for message in messages %}{{ ' ' + message['role'] + ': ' + message['content'] + ' [SEP]' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' assistant:' }}{% endif %}"
)


def _save_remote_code_model(directory: Path, code_dir: Path, config_dict: dict, seed: int) -> None:
    """Write config + code, then build the model through the real remote-code
    path (AutoConfig/AutoModel with trust_remote_code) and save its weights."""
    from transformers import AutoConfig, AutoModel

    for code in code_dir.glob("*.py"):
        shutil.copy(code, directory / code.name)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True)
    model.save_pretrained(directory, safe_serialization=True)


def build_llada(directory: Path, *, mask_in_config: bool = True, seed: int = 0, n_layers: int = 2) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|mdm_mask|>"]
    tokenizer = word_tokenizer(specials, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                pad_token="<|endoftext|>")
    tokenizer.chat_template = LLADA_TEMPLATE
    tokenizer.save_pretrained(directory)
    mask_id = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    config = {
        "model_type": "tiny_llada",
        "architectures": ["TinyLLaDAModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny_llada.TinyLLaDAConfig",
            "AutoModel": "modeling_tiny_llada.TinyLLaDAModelLM",
            "AutoModelForCausalLM": "modeling_tiny_llada.TinyLLaDAModelLM",
        },
        "vocab_size": len(tokenizer),
        "d_model": 64, "n_layers": n_layers, "n_heads": 4, "mlp_hidden_size": 128,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if mask_in_config:
        config["mask_token_id"] = mask_id
    _save_remote_code_model(directory, FIXTURES / "tiny_llada", config, seed)
    return directory


def build_dream(directory: Path, *, seed: int = 0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    tokenizer = word_tokenizer(specials, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(directory)
    config = {
        "model_type": "tiny_dream",
        "architectures": ["TinyDreamModel"],
        "auto_map": {
            "AutoConfig": "configuration_tiny_dream.TinyDreamConfig",
            "AutoModel": "modeling_tiny_dream.TinyDreamModel",
        },
        "vocab_size": len(tokenizer),
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "mask_token_id": tokenizer.convert_tokens_to_ids("<|mask|>"),
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    _save_remote_code_model(directory, FIXTURES / "tiny_dream", config, seed)
    return directory


def build_masked_lm(directory: Path, *, seed: int = 0, chat_template: bool = True) -> Path:
    """A native transformers ModernBERT masked-LM with a declared [MASK] token."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tokenizer = word_tokenizer(specials, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                mask_token="[MASK]")
    if chat_template:
        tokenizer.chat_template = BERT_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, global_attn_every_n_layers=1, local_attention=64, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    ModernBertForMaskedLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def build_causal_lm(directory: Path) -> Path:
    """A tiny autoregressive Llama, which mdu must refuse."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory
