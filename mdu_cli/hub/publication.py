"""What `mdu push` publishes of a run's paperwork: how the model was made,
never where the user keeps things.

The run record, the delta report and eval.json name local files (the forget
file's path, whose name may be the very person being forgotten, the base
model's directory, the output, the config). What goes up is a copy made in
memory with every local path replaced by LOCAL; Hub ids, hf:// names,
hashes and options stay. A last check reads every text that goes up and
refuses the push if a local path, or the name of a local data or config
file, is still in it. `--include-local-paths` publishes the files as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from mdu_cli.config.fields import path_fields
from mdu_cli.config.training import CONFIGS
from mdu_cli.errors import MduError
from mdu_cli.io.output_location import DELTA_JSON, EVAL_REPORT, RUN_RECORD

LOCAL = "(local)"
# The paperwork pushed from memory; each is read from the output directory.
PAPERWORK = (RUN_RECORD, DELTA_JSON, EVAL_REPORT, "adapter_config.json")
# Keys whose string values name a model, a file or a folder, in any of them
# (an adapter names its base in base_model_name_or_path).
PATH_KEYS = frozenset({"model", "path", "source", "id", "real_authors", "world_facts", "reference",
                       "base_model_name_or_path",
                       # every option of a training run that may name a local file or folder
                       *(name for cls in CONFIGS.values() for name in path_fields(cls))})
# Keys whose values name whom the model was made to forget (an RWKU --target):
# taken out like a local path, so the last check also refuses any text naming them.
SUBJECT_KEYS = frozenset({"target", "subject"})
# Per-probe lists of a benchmark report (RWKU's "results"): they quote the forget
# probes, which are about the target; the aggregates beside them go up.
RECORD_KEYS = frozenset({"results"})
# Names shorter than this are words ("model", "data"), not identifying file names.
MIN_NAME_LENGTH = 8


def _public_ids(run: dict) -> set[str]:
    """The Hub ids the run record itself says are on the Hub."""
    base = run.get("base_model") or {}
    return {base["id"]} if base.get("is_hub") and isinstance(base.get("id"), str) else set()


def _is_public(value: str, public_ids: set[str]) -> bool:
    return value.startswith("hf://") or value in public_ids


def _redact(value, public_ids: set[str], found: set[str], key: Optional[str] = None):
    """A copy of a JSON value (new dicts and lists all the way down) with each
    local path under PATH_KEYS replaced by LOCAL; what was replaced is added
    to `found`."""
    if isinstance(value, dict):
        return {k: _redact(v, public_ids, found, k) for k, v in value.items() if k not in RECORD_KEYS}
    if isinstance(value, list):
        return [_redact(v, public_ids, found, key) for v in value]
    if isinstance(value, str) and key in SUBJECT_KEYS and value:
        found.add(value)
        return LOCAL
    if isinstance(value, str) and key in PATH_KEYS and value and not _is_public(value, public_ids):
        found.add(value)
        return LOCAL
    return value


def redact_paths(document: dict, public_ids: set[str]) -> dict:
    """A copy of `document` with every local path under PATH_KEYS as LOCAL
    (what a tracker's servers receive of the options, too)."""
    return _redact(document, set(public_ids), set())


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        raise MduError(f"{path}: not valid JSON; restore the file mdu wrote") from None


def public_paperwork(directory: Path) -> tuple[dict[str, dict], set[str]]:
    """The run record, delta report and eval.json as published (the ones the
    directory has), and the local values that were taken out of them."""
    documents = {name: _read_json(directory / name) for name in PAPERWORK}
    run = documents.get(RUN_RECORD) or {}
    public_ids, found = _public_ids(run), set()
    published = {name: _redact(doc, public_ids, found) for name, doc in documents.items() if doc is not None}
    return published, found


def encoded(document: dict) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def local_names(found: set[str], directory: Path) -> set[str]:
    """What must not appear in anything published: each local path taken out,
    the output directory's own path, and the file names among them long
    enough to identify (a forget file called forget-john-doe.jsonl)."""
    names = set(found) | {str(Path(os.path.abspath(directory)))}
    for value in list(names):
        name = Path(value).name
        if len(name) >= MIN_NAME_LENGTH and "." in name:
            names.add(name)
    return {n for n in names if n and n != LOCAL}


def check_published(texts: dict[str, str], forbidden: set[str]) -> None:
    """Refuse, before the first network call, a push whose text still names a
    local path or file."""
    for name, text in texts.items():
        for value in sorted(forbidden, key=len, reverse=True):
            if value in text:
                raise MduError(f"{name} would publish the local name {value!r}; mdu publishes no local paths or "
                               "file names (they may name the person being forgotten): remove it from the file, "
                               "or pass --include-local-paths to publish it as it is")
