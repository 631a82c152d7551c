"""RWKU's files: where they come from, what each row must hold, one target's rows.

RWKU (Real-World Knowledge Unlearning) ships one JSON file per probe set under
`All/` of the Hub dataset `jinzhuoran/RWKU` (its Hub configs map to these
files); every row names the person it is about in `subject` (`target` in
`intro.json`). `--rwku` takes that repository (`hf://datasets/OWNER/NAME`,
optionally `@REVISION`: each file is fetched through the Hugging Face cache,
offline mode and the Hub timeout apply, and the resolved commit is recorded) or
a local directory with the same layout (DIR/All/<file>.json). Everything here
is read and checked before any weights load. No torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mdu_cli.errors import ConfigError, DataError, MduError

RWKU_REPO = "jinzhuoran/RWKU"
DEFAULT_SOURCE = f"hf://datasets/{RWKU_REPO}"
PARTS = ("forget", "neighbor", "mia", "utility")

# set name -> file under All/, as RWKU's Hub configs name them
FILES = {
    "intro": "intro.json",                  # config forget_target
    "forget_level1": "forget_level1.json",
    "forget_level2": "forget_level2.json",
    "forget_level3": "forget_level3.json",
    "neighbor_level1": "neighbor_level1.json",
    "neighbor_level2": "neighbor_level2.json",
    "forget_mia": "forget_mia.json",        # config mia_forget
    "retain_mia": "retain_mia.json",        # config mia_retain
    "general": "retain_mmlu.json",          # config utility_general (MMLU)
    "reasoning": "retain_bbh.json",         # config utility_reason (BBH)
    "truthfulness": "truthful.json",        # config utility_truthfulness (TruthfulQA)
    "factuality": "triviaqa.json",          # config utility_factuality (TriviaQA)
    "fluency": "fluency.json",              # config utility_fluency (AlpacaEval instructions)
}
PART_SETS = {
    "forget": ("forget_level1", "forget_level2", "forget_level3"),
    "neighbor": ("neighbor_level1", "neighbor_level2"),
    "mia": ("forget_mia", "retain_mia"),
    "utility": ("general", "reasoning", "truthfulness", "factuality", "fluency"),
}
PROBE = {"query": str, "answer": str, "level": (str, int)}
# The fields each set's rows need (besides `subject`), with their types.
FIELDS = {
    "intro": {"target": str, "intro": str},
    "forget_level1": PROBE, "forget_level2": PROBE, "forget_level3": {**PROBE, "type": str},
    "neighbor_level1": PROBE, "neighbor_level2": PROBE,
    "forget_mia": {"text": str}, "retain_mia": {"text": str},
    "general": {"question": str, "choices": list, "answer": int, "task": str, "examples": list},
    "reasoning": {"cot": str, "question": str, "answer": (str, list)},
    "truthfulness": {"question": str, "mc1_targets": dict, "mc2_targets": dict},
    "factuality": {"question": str, "answers": list},
    "fluency": {"instruction": str},
}


@dataclass(frozen=True)
class RwkuFile:
    """One RWKU file as read: where from, its hash, how many rows were the target's."""

    path: Path                      # the file read (a Hub file: its copy in the cache)
    label: str                      # what messages call it
    sha256: str
    rows: int
    hub: Optional[dict] = None

    def summary(self) -> dict:
        summary = {"path": self.label, "sha256": self.sha256, "records": self.rows}
        if self.hub:
            summary["hub"] = self.hub
        return summary


@dataclass(frozen=True)
class RwkuData:
    target: str
    intro: str
    sets: dict            # set name -> list of row dicts (the target's, after --limit)
    files: dict           # set name -> RwkuFile
    source: dict          # what --rwku named, and the commit it resolved to


def parse_source(source: str) -> tuple[str, Optional[str], Optional[Path]]:
    """(repo id, revision, None) for a Hub repository, (None, None, dir) for a
    local directory; a usage error for anything else."""
    from mdu_cli.config.hub_names import check_revision

    if source.startswith("hf://"):
        rest = source[len("hf://datasets/"):] if source.startswith("hf://datasets/") else None
        repo, _, revision = (rest or "").partition("@")
        if rest is None or repo.count("/") != 1 or not all(repo.split("/")):
            raise ConfigError(f"--rwku {source}: expected hf://datasets/OWNER/NAME[@REVISION] (the repository, "
                              f"e.g. {DEFAULT_SOURCE}) or a local directory holding All/*.json")
        if _ and not revision:
            raise ConfigError(f"--rwku {source}: the revision after '@' is empty; drop the '@' or name one")
        check_revision(revision or None, f"--rwku {source}: the revision")
        return repo, revision or None, None
    directory = Path(source)
    if not directory.is_dir():
        raise MduError(f"--rwku {source}: no such directory; give a directory holding All/*.json, or "
                       f"{DEFAULT_SOURCE}[@REVISION]")
    return None, None, directory


def _fetch(source: str, name: str) -> tuple[Path, str, Optional[dict]]:
    repo, revision, directory = parse_source(source)
    relative = f"All/{FILES[name]}"
    if directory is not None:
        path = directory / relative
        if not path.is_file():
            raise MduError(f"{path}: no such file; --rwku {source} must hold RWKU's layout (All/{FILES[name]})")
        return path, str(path), None
    from mdu_cli.data.hub import fetch

    hub_file = fetch(f"hf://datasets/{repo}/{relative}" + (f"@{revision}" if revision else ""))
    return hub_file.local_path, hub_file.uri, hub_file.provenance()


def _check_row(name: str, row, where: str) -> Optional[str]:
    if not isinstance(row, dict):
        return f"{where}: a row is a JSON object, not a {type(row).__name__}"
    fields = dict(FIELDS[name]) if name == "intro" else {"subject": str, **FIELDS[name]}
    for field, kind in fields.items():
        if field not in row:
            return f'{where}: no "{field}" field; every row of {FILES[name]} needs {", ".join(fields)}'
        if not isinstance(row[field], kind) or isinstance(row[field], bool):
            return f'{where}: "{field}" is a {type(row[field]).__name__}; RWKU gives it as ' + (
                " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__)
    return _check_shape(name, row, where)


def _check_shape(name: str, row: dict, where: str) -> Optional[str]:
    """What a field's type alone does not say: choices, answer indices, label lists."""
    if name == "general":
        for example in [row, *row["examples"]]:
            if not isinstance(example, dict):
                return f'{where}: every item of "examples" is an object with "question", "choices" and "answer"'
            choices, answer = example.get("choices"), example.get("answer")
            if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(
                    isinstance(c, str) for c in choices):
                return f'{where}: "choices" (here or in "examples") must be a list of 2 to 26 strings'
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                return f'{where}: "answer" (here or in "examples") must be the index of the right choice'
            if not isinstance(example.get("question"), str):
                return f'{where}: every example in "examples" needs a "question" string'
    if name == "truthfulness":
        for key in ("mc1_targets", "mc2_targets"):
            targets = row[key]
            choices, labels = targets.get("choices"), targets.get("labels")
            if (not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels)
                    or not all(isinstance(c, str) for c in choices) or any(label not in (0, 1) for label in labels)):
                return f'{where}: "{key}" must hold "choices" and as many 0/1 "labels"'
            if 1 not in labels or 0 not in labels:
                return f'{where}: "{key}" needs at least one true and one false choice'
        if row["mc1_targets"]["labels"][0] != 1:
            return f'{where}: "mc1_targets" lists its true choice first, as TruthfulQA does'
    if name == "factuality" and (not row["answers"] or not all(isinstance(a, str) for a in row["answers"])):
        return f'{where}: "answers" must be a non-empty list of strings'
    if name == "reasoning" and isinstance(row["answer"], list) and not all(isinstance(a, str) for a in row["answer"]):
        return f'{where}: "answer" must be a string or a list of strings'
    return None


def _read_set(source: str, name: str, target: Optional[str]) -> tuple[list[dict], RwkuFile, list[str]]:
    """The rows of one file (the target's only, when a target is given), its
    summary, and the targets the file knows (for intro.json)."""
    from mdu_cli.data.records import capped, read_objects

    path, label, hub = _fetch(source, name)
    parsed, sha256 = read_objects(path, label)
    key = "target" if name == "intro" else "subject"
    problems, rows, known = [], [], []
    for line, row in parsed:
        where = f"{label}:{line}"
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            problems.append(_check_row(name, row, where) or f'{where}: "{key}" must be a string')
            continue
        known.append(row[key])
        if target is not None and row[key] != target:
            continue
        problem = _check_row(name, row, where)
        if problem:
            problems.append(problem)
        else:
            rows.append(row)
    if problems:
        raise DataError(capped(problems, label))
    return rows, RwkuFile(path, label, sha256, len(rows), hub), known


def closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or difflib.get_close_matches(
        name.lower(), [k.lower() for k in known], n=3, cutoff=0.5)
    if close:
        return "closest: " + ", ".join(repr(k) for k in close)
    return f"{len(known)} targets, e.g. " + ", ".join(repr(k) for k in known[:3])


def read_target(source: str, target: str, parts: tuple[str, ...] = PARTS, limit: Optional[int] = None) -> RwkuData:
    """One target's rows of every set the parts need, each checked; the
    target itself is looked up in intro.json first, so a typo costs no more
    downloads."""
    intro_rows, intro_file, known = _read_set(source, "intro", None)
    matches = [row for row in intro_rows if row["target"] == target]
    if not matches:
        raise MduError(f"--target {target!r} is not one of RWKU's targets in {intro_file.label} "
                       f"({closest(target, known)}); write the name as RWKU does")
    sets, files = {}, {"intro": intro_file}
    for part in parts:
        for name in PART_SETS[part]:
            rows, summary, _ = _read_set(source, name, target)
            if not rows:
                raise MduError(f"{summary.label}: no rows for {target!r}; this RWKU copy lacks the target's "
                               f"{name} set (leave out --part {part}, or use the full dataset)")
            sets[name] = rows[:limit] if limit else rows
            files[name] = summary
    repo, revision, directory = parse_source(source)
    commits = sorted({f.hub["commit"] for f in files.values() if f.hub and f.hub.get("commit")})
    record = {"source": source, "repo_id": repo, "revision": revision, "commit": commits[0] if len(commits) == 1
              else (commits or None)} if repo else {"source": str(directory)}
    return RwkuData(target, matches[0]["intro"], sets, files, record)


def read_intro(source: str, target: str) -> tuple[str, dict, RwkuFile]:
    """The target's intro (for `mdu corpus`), where it came from, and the file."""
    data = read_target(source, target, parts=())
    return data.intro, data.source, data.files["intro"]
