"""Turning records into token ids with exact prompt/response boundaries.

The prompt is the chat template over every turn but the last, with the
generation prompt (the assistant header). The response is tokenised on its
own: the final assistant content plus the template's end-of-turn marker.
Tokenising the two parts separately is what guarantees that no prompt token is
ever counted as response, and that a trailing assistant header (the hub LLaDA
template appends one even without `add_generation_prompt`) never is either.

Record text is tokenised as text: a question or answer that contains the text
of one of the tokenizer's control tokens (`[MASK]`, `<|mdm_mask|>`,
`<|eot_id|>`, `<|start_header_id|>`, ...) gets the ordinary tokens of those
characters, never the control token, so data can neither put mask tokens
into the clean targets nor fake a turn of the chat template. Only the
template's own markup becomes control tokens.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mdu_cli.data.records import Dataset, capped
from mdu_cli.errors import DataError, MduError

log = logging.getLogger("mdu")

# Stands in for the assistant content when the template is rendered to find
# what follows an answer. Invisible separators keep it from merging with
# anything a template could put around it.
_SENTINEL = "\u2063mdu-response-sentinel\u2063"


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    truncated: bool = False


@dataclass
class Batch:
    """Right-padded token ids of a micro-batch; every tensor is (batch, seq).

    `response_mask` is True exactly at response tokens, `prompt_mask` exactly at
    prompt tokens, and padding is where `attention_mask` is 0.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device) -> "Batch":
        tensors = (self.input_ids, self.attention_mask, self.prompt_mask, self.response_mask)
        return Batch(*(t.to(device) for t in tensors))


def _is_special(tokenizer, token_id: int) -> bool:
    if token_id in set(tokenizer.all_special_ids):
        return True
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return bool(added is not None and getattr(added, "special", False))


# Stands in for a control token's text inside record text while the chat
# template renders: characters of a Unicode private-use plane that no template
# transforms (trim and friends touch whitespace only).
_CONTROL_OPEN, _CONTROL_CLOSE = "\U000f0000", "\U000f0001"
_PLACEHOLDER = re.compile(f"{_CONTROL_OPEN}(\\d+){_CONTROL_CLOSE}")


def control_texts(tokenizer) -> list[str]:
    """The texts this tokenizer reads as control tokens (its special and
    added special tokens), longest first so that no shorter one splits a
    longer one."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    texts |= {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
              if getattr(token, "special", False)}
    return sorted((t for t in texts if t), key=len, reverse=True)


def _hide_controls(text: str, controls: list[str], hidden: list[str]) -> str:
    """`text` with each control token's text replaced by a numbered placeholder
    (appended to `hidden`), to be tokenised as plain text later."""
    if not any(c in text for c in controls):
        return text
    pattern = re.compile("|".join(re.escape(c) for c in controls))

    def placeholder(match: re.Match) -> str:
        hidden.append(match.group(0))
        return f"{_CONTROL_OPEN}{len(hidden) - 1}{_CONTROL_CLOSE}"

    return pattern.sub(placeholder, text)


def _ids(tokenizer, text: str, hidden: list[str]) -> list[int]:
    """Token ids of `text`, each placeholder tokenised as the plain text it hides.
    Without placeholders this is exactly the tokenizer's own call: text with no
    control token's text in it tokenises as it always did."""
    if not hidden:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    ids: list[int] = []
    parts = _PLACEHOLDER.split(text)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                ids += tokenizer(part, add_special_tokens=False)["input_ids"]
        else:
            ids += tokenizer(hidden[int(part)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def encode_text(tokenizer, text: str) -> list[int]:
    """Record text (an answer) as token ids, control tokens' text as plain text."""
    hidden: list[str] = []
    return _ids(tokenizer, _hide_controls(text, control_texts(tokenizer), hidden), hidden)


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The token the chat template puts right after an assistant answer, if it is
    a special token (`<|eot_id|>` for LLaDA, `<|im_end|>` for Qwen/Dream).

    Whatever follows it (a newline, or the assistant header LLaDA's template
    appends) is not part of the answer.
    """
    rendered = render_chat(tokenizer, [{"role": "user", "content": "hello"},
                                       {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False)
    if _SENTINEL not in rendered:
        raise MduError("the chat template does not render the assistant content; pass --chat-template FILE")
    suffix = rendered[rendered.rindex(_SENTINEL) + len(_SENTINEL):]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix.strip() else []
    if suffix_ids and _is_special(tokenizer, suffix_ids[0]):
        return int(suffix_ids[0])
    return None


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str = "") -> str:
    """The chat template applied to `messages`, as text. A template that fails
    (a Jinja syntax error, or one that raises on these roles) is named."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        at = f"{where}: " if where else ""
        raise MduError(f"{at}the chat template fails ({type(err).__name__}: {err}); fix it, or pass "
                       "--chat-template FILE with one that renders user and assistant turns") from None
    if not isinstance(text, str):
        raise MduError("the chat template does not render text; pass --chat-template FILE")
    return text


def encode_prompt(tokenizer, prompt_messages: list[dict], where: str = "") -> list[int]:
    """The prompt's token ids: the chat template's markup as control tokens, the
    turns' own text as text."""
    controls, hidden = control_texts(tokenizer), []
    messages = [{**m, "content": _hide_controls(m["content"], controls, hidden)}
                if isinstance(m.get("content"), str) else m for m in prompt_messages]
    text = render_chat(tokenizer, messages, add_generation_prompt=True, where=where)
    # The template already writes BOS and every special token as text.
    return _ids(tokenizer, text, hidden)


def encode_dataset(dataset: Dataset, tokenizer, max_length: int, positions: Optional[int] = None) -> list[Example]:
    """Tokenise every record; a prompt that leaves no room for the response is an
    error naming its line, a response that does not fit is cut (one warning).

    `positions` is the longest sequence the model takes (from its config): a
    record longer than that, even after the cut to `max_length`, would run
    the model past its positions, which trains on garbage rather than failing.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise MduError(
            "the tokenizer has no chat template; pass --chat-template FILE with a Jinja template "
            "that renders user and assistant turns"
        )
    eot = end_of_turn_id(tokenizer)
    examples, problems, cut = [], [], 0
    for record in dataset.records:
        prompt_ids = encode_prompt(tokenizer, record.prompt_messages, where=record.source)
        response_ids = encode_text(tokenizer, record.response)
        if eot is not None:
            response_ids.append(eot)
        if len(prompt_ids) >= max_length:
            problems.append(
                f"{record.source}: the prompt alone is {len(prompt_ids)} tokens, leaving no room for the "
                f"response within --max-length {max_length}; shorten the prompt or raise --max-length"
            )
            continue
        room = max_length - len(prompt_ids)
        truncated = len(response_ids) > room
        if truncated:
            cut += 1
            response_ids = response_ids[:room]
        if not response_ids:
            problems.append(f"{record.source}: the response tokenises to nothing; give a non-empty answer")
            continue
        if positions is not None and len(prompt_ids) + len(response_ids) > positions:
            problems.append(
                f"{record.source}: the record is {len(prompt_ids) + len(response_ids)} tokens, more than the "
                f"{positions} positions the model takes; lower --max-length to {positions} or shorten the record"
                if len(prompt_ids) < positions else
                f"{record.source}: the prompt alone is {len(prompt_ids)} tokens, more than the {positions} "
                "positions the model takes; shorten the prompt"
            )
            continue
        examples.append(Example(tuple(prompt_ids), tuple(response_ids), truncated))
    if problems:
        # As the record reader does: a file of 100,000 bad records gets 50 lines, not 100,000.
        raise DataError(capped(problems, str(dataset.path), what="records with the same kind of problem"))
    if cut:
        log.warning(
            "Warning: %d of %d records in %s have responses cut to fit --max-length %d",
            cut, len(examples), dataset.path, max_length,
        )
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad a list of examples into a Batch."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    prompt_mask = torch.zeros(shape, dtype=torch.bool)
    response_mask = torch.zeros(shape, dtype=torch.bool)
    for row, example in enumerate(examples):
        n_prompt, n_total = len(example.prompt_ids), len(example.prompt_ids) + len(example.response_ids)
        input_ids[row, :n_total] = torch.tensor(example.prompt_ids + example.response_ids)
        attention_mask[row, :n_total] = 1
        prompt_mask[row, :n_prompt] = True
        response_mask[row, n_prompt:n_total] = True
    return Batch(input_ids, attention_mask, prompt_mask, response_mask)


def pad_token_id(tokenizer) -> int:
    # LLaDA pads with EOS (its SFT recipe does); any id works where the
    # attention mask is honoured, since padding is never scored.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
