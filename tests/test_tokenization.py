"""Prompt/response boundaries under the three chat templates."""

import logging

import pytest
from transformers import AutoTokenizer

from mdu_cli.data.records import Dataset, Record
from mdu_cli.data.tokenization import encode_dataset, end_of_turn_id
from mdu_cli.errors import DataError, MduError


def _dataset(*pairs):
    records = tuple(
        Record(messages=({"role": "user", "content": q}, {"role": "assistant", "content": a}), source=f"f.jsonl:{i + 1}")
        for i, (q, a) in enumerate(pairs)
    )
    return Dataset(path="f.jsonl", records=records, sha256="0" * 64)


def test_llada_template_that_appends_the_assistant_header(llada_dir):
    tokenizer = AutoTokenizer.from_pretrained(llada_dir)
    messages = [{"role": "user", "content": "who wrote the book ?"}, {"role": "assistant", "content": "astrid wrote it ."}]
    # The template really does append a header after the final answer.
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    [example] = encode_dataset(_dataset(("who wrote the book ?", "astrid wrote it .")), tokenizer, 512)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    header = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    assert list(example.response_ids) == tokenizer("astrid wrote it .", add_special_tokens=False).input_ids + [eot]
    assert header not in example.response_ids
    prompt_text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert list(example.prompt_ids) == tokenizer(prompt_text, add_special_tokens=False).input_ids
    assert example.prompt_ids[0] == tokenizer.bos_token_id
    assert example.prompt_ids[-3:] == (header, tokenizer.convert_tokens_to_ids("assistant"),
                                       tokenizer.convert_tokens_to_ids("<|end_header_id|>"))
    # Prompt + response is the full rendering up to and including the answer's <|eot_id|>.
    full_ids = tokenizer(full, add_special_tokens=False).input_ids
    assert list(example.prompt_ids + example.response_ids) == full_ids[: len(example.prompt_ids) + len(example.response_ids)]
    assert len(full_ids) > len(example.prompt_ids) + len(example.response_ids)


def test_qwen_template_marks_im_end(dream_dir):
    tokenizer = AutoTokenizer.from_pretrained(dream_dir)
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    [example] = encode_dataset(_dataset(("where do fish live ?", "in the sea .")), tokenizer, 512)
    assert example.response_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(example.prompt_ids).count("<|im_start|>") == 3  # system, user, assistant header


def test_bert_template_marks_sep(masked_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(masked_lm_dir)
    [example] = encode_dataset(_dataset(("where do fish live ?", "in the sea .")), tokenizer, 512)
    assert example.response_ids[-1] == tokenizer.sep_token_id
    assert example.prompt_ids[0] == tokenizer.cls_token_id


def test_prompt_too_long_names_the_line(llada_dir):
    tokenizer = AutoTokenizer.from_pretrained(llada_dir)
    long_prompt = " ".join(["the"] * 40)
    with pytest.raises(DataError) as err:
        encode_dataset(_dataset(("who ?", "me ."), (long_prompt, "yes .")), tokenizer, 30)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("f.jsonl:2: the prompt alone is")
    assert "--max-length 30" in err.value.problems[0]


def test_long_response_is_cut_with_one_warning(llada_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(llada_dir)
    long_answer = " ".join(["river"] * 50)
    with caplog.at_level(logging.WARNING, logger="mdu"):
        examples = encode_dataset(_dataset(("who ?", long_answer), ("why ?", long_answer), ("how ?", "fine .")),
                                  tokenizer, 30)
    assert [len(e.prompt_ids) + len(e.response_ids) for e in examples[:2]] == [30, 30]
    assert [e.truncated for e in examples] == [True, True, False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 3 records" in warnings[0].getMessage()


def test_no_chat_template_is_a_clear_error(models_dir):
    import tiny_models

    directory = tiny_models.build_masked_lm(models_dir / "no-template", chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with pytest.raises(MduError, match="--chat-template"):
        encode_dataset(_dataset(("q ?", "a .")), tokenizer, 64)
