"""Reading and validating forget/retain files.

A file is JSONL (one record per line) or one JSON array of records. A record is
one of
    {"question": ..., "answer": ...}          (TOFU style)
    {"prompt": ..., "completion": ...}
    {"prompt": ..., "response": ...}
    {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}
and any other fields are ignored, except TOFU's `perturbed_answer` (a string
or a list of wrong answers) and `paraphrased_answer`, read for the truth ratio.
Every record becomes a list of chat messages ending with the assistant turn whose tokens are unlearned.

Files are validated completely before anything heavy happens, and every bad
record is reported as `FILE:LINE: what is wrong, what to do`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mdu_cli.errors import DataError, MduError

SCHEMAS_HINT = (
    'use {"question", "answer"}, {"prompt", "completion"}, {"prompt", "response"} '
    'or {"messages": [...]} ending with an assistant turn'
)


@dataclass(frozen=True)
class Record:
    """One example: the chat turns, the last of which is the assistant's answer."""

    messages: tuple[dict, ...]
    source: str  # "FILE:LINE", for error messages that must name the record
    perturbed: tuple[str, ...] = ()  # TOFU's perturbed_answer: wrong answers, for the truth ratio
    paraphrased: Optional[str] = None  # TOFU's paraphrased_answer: the answer reworded, for the truth ratio

    @property
    def prompt_messages(self) -> list[dict]:
        return [dict(m) for m in self.messages[:-1]]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Dataset:
    path: Path  # the file read (for a Hub file, its copy in the Hugging Face cache)
    records: tuple[Record, ...]
    sha256: str
    hub: Optional[dict] = None  # for hf://datasets/... names: repository, file, revision and resolved commit
    name: Optional[str] = None  # what the user wrote, when it is not the path

    def __len__(self) -> int:
        return len(self.records)

    def summary(self) -> dict:
        # Only the hash and the count: the content must never leave the user's file.
        summary = {"path": self.name or str(self.path), "sha256": self.sha256, "records": len(self.records)}
        if self.hub:
            summary["hub"] = self.hub
        return summary


def _check_text(value, field: str) -> str | None:
    """Return what is wrong with a text field, or None."""
    if value is None:
        return f'missing field "{field}"'
    if not isinstance(value, str):
        return f'field "{field}" must be a string, got {type(value).__name__}'
    if not value.strip():
        return f'field "{field}" is empty'
    return _surrogate_problem(value, field)


def _surrogate_problem(value: str, field: str) -> str | None:
    """JSON's \\uXXXX escapes can spell half of a surrogate pair, which is no
    character at all: no tokenizer or file can take it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f'field "{field}" holds an unpaired surrogate (\\u{ord(value[err.start]):04x}), which is not text; '
                "fix the \\u escape")
    return None


def _messages_from_record(obj) -> tuple[list[dict] | None, str | None]:
    """Turn one parsed JSON value into chat messages, or say what is wrong."""
    if not isinstance(obj, dict):
        return None, f"a record must be a JSON object, got {type(obj).__name__}; {SCHEMAS_HINT}"

    if "messages" in obj:
        turns = obj["messages"]
        if not isinstance(turns, list) or not turns:
            return None, 'field "messages" must be a non-empty list of {"role", "content"} turns'
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                return None, f"messages[{i}] must be an object with \"role\" and \"content\""
            role_problem = _check_text(turn.get("role"), f"messages[{i}].role")
            if role_problem:
                return None, role_problem
            content_problem = _check_text(turn.get("content"), f"messages[{i}].content")
            if content_problem:
                return None, content_problem
            messages.append({"role": turn["role"], "content": turn["content"]})
        if messages[-1]["role"] != "assistant":
            return None, (
                f'no final assistant turn (the last role is "{messages[-1]["role"]}"); '
                "end the messages with the assistant answer to unlearn"
            )
        if len(messages) < 2:
            return None, "messages hold only the assistant turn; add the prompt turn before it"
        return messages, None

    if "question" in obj or "answer" in obj:
        prompt_key, answer_key, answer_name = "question", "answer", '"answer"'
    elif any(key in obj for key in ("prompt", "completion", "response")):
        answer_key = "completion" if "completion" in obj else "response"
        prompt_key, answer_name = "prompt", '"completion" (or "response")'
    else:
        prompt_key = None
    if prompt_key:
        problem = _check_text(obj.get(prompt_key), prompt_key)
        if not problem and answer_key not in obj:
            problem = f"missing field {answer_name}"
        problem = problem or _check_text(obj.get(answer_key), answer_key)
        if problem:
            return None, problem
        return [
            {"role": "user", "content": obj[prompt_key]},
            {"role": "assistant", "content": obj[answer_key]},
        ], None

    return None, f"no recognised fields (found {', '.join(sorted(obj)) or 'none'}); {SCHEMAS_HINT}"


def _perturbed_answers(obj) -> tuple[tuple[str, ...], str | None]:
    """The optional TOFU `perturbed_answer` field: a string or a list of strings."""
    if not isinstance(obj, dict) or obj.get("perturbed_answer") is None:
        return (), None
    value = obj["perturbed_answer"]
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
        return (), 'field "perturbed_answer" must be a non-empty string or a list of them'
    for answer in answers:
        problem = _surrogate_problem(answer, "perturbed_answer")
        if problem:
            return (), problem
    return tuple(answers), None


def _paraphrased_answer(obj) -> tuple[Optional[str], str | None]:
    """The optional TOFU `paraphrased_answer` field: one non-empty string."""
    if not isinstance(obj, dict) or obj.get("paraphrased_answer") is None:
        return None, None
    value = obj["paraphrased_answer"]
    problem = _check_text(value, "paraphrased_answer")
    return (None, problem) if problem else (value, None)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError([f"{path}:{line}: not valid UTF-8 text; save the file as UTF-8"]) from None


def _parse_array(path: str, text: str) -> list[tuple[int, object]]:
    """Elements of a JSON array with the line each one starts on."""
    decoder = json.JSONDecoder()
    items = []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            obj, end = decoder.raw_decode(text, pos)
        except RecursionError:  # the whole array parsed once, so only depth can fail here
            raise DataError([f"{path}:{_line_of(text, pos)}: nested too deeply; a record is a flat object"]) from None
        items.append((_line_of(text, pos), obj))
        pos = end


def _parse(path: str, text: str) -> list[tuple[int, object | Exception]]:
    """(line, parsed value or the JSON error) for every record in the file."""
    stripped = text.strip()
    if not stripped:
        raise DataError([f"{path}:1: the file is empty; add at least one record"])
    try:
        document = json.loads(stripped)
    except RecursionError:
        document = None
        whole_parses = False
    except json.JSONDecodeError as err:
        document = None
        whole_parses = False
        if stripped.startswith("["):
            # A JSON array with something wrong in it (or garbage after it):
            # read line by line it would report valid records as errors.
            line = text[:len(text) - len(text.lstrip())].count("\n") + err.lineno
            raise DataError([f"{path}:{line}: the JSON array is not valid JSON ({err.msg} at column {err.colno}); "
                             "fix it, or write one JSON object per line (JSONL)"]) from None
    else:
        whole_parses = True

    if whole_parses and isinstance(document, list):
        if not document:
            raise DataError([f"{path}:1: the JSON array is empty; add at least one record"])
        return _parse_array(path, text)
    if whole_parses and not isinstance(document, dict):
        raise DataError([
            f"{path}:1: the file is a JSON {type(document).__name__}, not a list of records; "
            "write one JSON object per line (JSONL) or a JSON array of objects"
        ])
    nonblank = [line for line in text.splitlines() if line.strip()]
    if whole_parses and len(nonblank) > 1:
        # A single object spread over several lines: a JSON document, not JSONL.
        raise DataError([
            f"{path}:1: the file is one JSON object, not a list of records; "
            "write one JSON object per line (JSONL) or a JSON array of objects"
        ])

    parsed = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((number, json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as err:
            parsed.append((number, err))
    return parsed


MAX_PROBLEMS = 50  # error lines printed for one file; the rest are counted


def capped(problems: list[str], where: str, max_problems: int = MAX_PROBLEMS, what: str = "bad records") -> list[str]:
    """At most `max_problems` lines, and one that counts the rest."""
    extra = len(problems) - max_problems
    return problems[:max_problems] + ([f"{where}: ... and {extra} more {what}"] if extra > 0 else [])


def load_dataset(path: str | Path, max_problems: int = MAX_PROBLEMS) -> Dataset:
    """Read and validate a forget or retain file: a local path, or a Hub
    dataset file named `hf://datasets/OWNER/NAME/PATH[@REVISION]` (fetched
    through the Hugging Face cache; see `data.hub`).

    Raises DataError listing every bad record (at most `max_problems` lines,
    plus a count of the rest) and MduError for a missing or unreadable file.
    """
    from mdu_cli.config.hub_names import is_hub_data
    from mdu_cli.data.hub import fetch

    if is_hub_data(path):
        hub_file = fetch(str(path))
        dataset = _load_file(hub_file.local_path, hub_file.uri, max_problems)
        return Dataset(dataset.path, dataset.records, dataset.sha256, hub=hub_file.provenance(), name=hub_file.uri)
    return _load_file(Path(path), str(path), max_problems)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise MduError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise MduError(f"{path}: is a directory; give a .jsonl or .json file")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise MduError(f"{path}: not a regular file; give a .jsonl or .json file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise MduError(f"{path}: cannot read ({err.strerror}); check the file's permissions") from None


def read_objects(path: Path, label: str) -> tuple[list[tuple[int, object]], str]:
    """The (line, value) of every record of a JSON array or JSONL file in any
    shape, and the file's sha256, for readers with their own fields (a
    benchmark's files); DataError names the file and line of bad JSON."""
    raw = _read_bytes(path)
    parsed = _parse(label, _decode(label, raw))
    problems = [f"{label}:{line}: invalid JSON ({value.msg} at column {value.colno}); fix the syntax"
                for line, value in parsed if isinstance(value, json.JSONDecodeError)]
    problems += [f"{label}:{line}: nested too deeply; a record is a flat object"
                 for line, value in parsed if isinstance(value, RecursionError)]
    if problems:
        raise DataError(capped(problems, label))
    return parsed, hashlib.sha256(raw).hexdigest()


def _load_file(path: Path, label: str, max_problems: int) -> Dataset:
    """Read and validate one local file; messages name it as `label`."""
    display = label
    raw = _read_bytes(path)
    text = _decode(display, raw)
    records: list[Record] = []
    problems: list[str] = []
    for line, value in _parse(display, text):
        if isinstance(value, RecursionError):
            problems.append(f"{display}:{line}: nested too deeply; a record is a flat object")
            continue
        if isinstance(value, Exception):
            problems.append(f"{display}:{line}: invalid JSON ({value.msg} at column {value.colno}); fix the syntax")
            continue
        messages, problem = _messages_from_record(value)
        perturbed, perturbed_problem = _perturbed_answers(value)
        paraphrased, paraphrase_problem = _paraphrased_answer(value)
        problem = problem or perturbed_problem or paraphrase_problem
        if problem:
            problems.append(f"{display}:{line}: {problem}")
        else:
            records.append(Record(messages=tuple(messages), source=f"{display}:{line}", perturbed=perturbed,
                                  paraphrased=paraphrased))

    if problems:
        raise DataError(capped(problems, display, max_problems))
    return Dataset(path=path, records=tuple(records), sha256=hashlib.sha256(raw).hexdigest())
