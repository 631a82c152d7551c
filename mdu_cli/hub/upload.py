"""Publishing an unlearned checkpoint to the Hugging Face Hub: the model and its
paperwork, never the data.

What goes up is decided by an allow-list of names (`plan_upload`), shown in
full by `--dry-run`, and sent as an explicit list of commit operations, one
per planned file: no name is ever handed to the Hub client as a pattern. The
same commit deletes every file of the kinds mdu manages (weights, index,
adapter, config, code, tokenizer, mdu's reports) that the revision holds and
this output does not, so the revision ends up holding exactly this model.
Everything is checked locally before the first network call; every Hub
failure becomes one line saying what to do; the token is never printed,
logged or written; the local directory is never modified.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mdu_cli.errors import MduError, printable
from mdu_cli.hub.card import CARD_NAME, card_action, render_card
from mdu_cli.hub.publication import check_published, encoded, local_names, public_paperwork
from mdu_cli.io.output_location import OUTPUT_FILES, RUN_RECORD, TRAIN_LOG, is_within
from mdu_cli.io.safetensors_reader import Checkpoint, open_directory

# The model and its paperwork: what mdu writes into an output, less the
# training log. Anything else in the directory stays behind.
ALLOWED = tuple(name for name in OUTPUT_FILES if name != TRAIN_LOG)
# Of a revision's files, those that describe a model (weights of any format,
# indexes, configs, code, tokenizer, mdu's reports): when this output lacks
# one, the revision's copy belongs to another model and is deleted.
MANAGED_ON_HUB = (*ALLOWED, "*.bin", "*.pt", "*.pth", "*.ckpt", "*.index.json", "*.gguf")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".xlsx", ".pkl", ".pickle",
                 ".pt", ".bin", ".npy", ".npz", ".gz", ".zip", ".tar")
# Names uploaded as they are: letters, digits and . _ - only. Anything else
# (glob characters, spaces, control characters) stays behind.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TRUTHY = ("1", "true", "yes", "on")
log = logging.getLogger("mdu")


@dataclass
class UploadPlan:
    upload: list[dict] = field(default_factory=list)   # {"path", "size"[, "link_to"]}
    skip: list[dict] = field(default_factory=list)     # {"path", "size", "reason"}
    delete: list[str] = field(default_factory=list)    # revision files removed in the same commit (known at push)
    card: str = "keep"                                 # "write" or "keep"
    card_text: Optional[str] = None                    # the card to upload, when card == "write"
    # The paperwork sent from memory with local paths taken out (publication.py): name -> bytes.
    from_memory: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"upload": self.upload, "skip": self.skip, "delete": self.delete}


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _skip_reason(relative: str) -> Optional[str]:
    parts = relative.split("/")
    if any(part.startswith(".") for part in parts):
        return "hidden file"
    if len(parts) > 1:
        return "inside a subdirectory: not part of the model"
    name = parts[0]
    if name == TRAIN_LOG:
        return "training log: stays local"
    if _matches(name, ALLOWED):
        if not PLAIN_NAME.fullmatch(name):
            return "unusual characters in the name: only letters, digits and . _ - are uploaded"
        return None
    if name.lower().endswith(DATA_SUFFIXES):
        return "may hold data or pickles: never uploaded"
    return "not on the upload allow-list"


def check_output_dir(directory: Path) -> tuple[dict, Checkpoint]:
    """Refuse anything but a complete `mdu unlearn` output, before any network
    call; returns its run record and where its weights are."""
    import json

    def incomplete(problem: str) -> MduError:
        return MduError(f"{directory} is not a complete `mdu unlearn` output ({problem}); "
                        "push the directory that `mdu unlearn --out` wrote")

    if not directory.is_dir():
        raise MduError(f"{directory}: no such directory")
    # Links first: a dangling config.json should be named as what it is, not
    # reported as a missing file.
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() and _skip_reason(entry.name) is None:
            _readable_file(entry, entry.name)
    try:
        run = json.loads((directory / RUN_RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise incomplete("no mdu_run.json") from None
    except (OSError, ValueError, RecursionError):
        raise incomplete("mdu_run.json is not valid JSON") from None
    if not isinstance(run, dict) or run.get("tool") != "mdu" or not isinstance(run.get("base_model"), dict) \
            or not isinstance(run.get("config"), dict):
        raise incomplete("mdu_run.json was not written by mdu unlearn")
    if not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise incomplete("no config.json (nor adapter_config.json)")
    try:
        weights = open_directory(directory, str(directory))
    except MduError as err:
        raise incomplete(f"weights unreadable: {err}") from None
    if not weights.tensors:
        raise incomplete("the weights hold no tensors")
    return run, weights


def _walk(directory: Path) -> dict[str, Path]:
    """Every entry below `directory` (files, links, other non-directories) by
    its relative posix path; links to directories are listed, not entered."""
    entries = {}
    for root, dirs, files in os.walk(directory, followlinks=False):
        base = Path(root)
        for name in files + [d for d in dirs if (base / d).is_symlink()]:
            path = base / name
            entries[path.relative_to(directory).as_posix()] = path
    return entries


def _readable_file(path: Path, relative: str, directory: Optional[Path] = None) -> tuple[int, Optional[str]]:
    """(size, link target) of a file to upload, read through a symbolic link
    that stays inside the directory; a named error for a dangling link, a
    link leading outside, a non-file, or a file that cannot be read."""
    directory = directory or path.parent
    shown = printable(relative)
    target = None
    if path.is_symlink():
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise MduError(f"{directory / shown}: a symbolic link to nothing ({printable(os.readlink(path))}); "
                           "replace it with the file, or remove it") from None
        if not is_within(resolved, directory):
            raise MduError(f"{directory / shown}: a symbolic link that leads outside {directory}; copy the file "
                           "in instead, so that what is uploaded is what the directory holds")
        target = str(resolved)
    try:
        info = path.stat()
    except OSError as err:
        raise MduError(f"{directory / shown}: cannot read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise MduError(f"{directory / shown}: not a regular file; replace it with the file, or remove it")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise MduError(f"{directory / shown}: cannot read ({err.strerror}); check its permissions") from None
    return info.st_size, target


def plan_upload(directory: Path, weights: Checkpoint, regenerate_card: bool = False,
                repo_id: Optional[str] = None, include_local_paths: bool = False) -> UploadPlan:
    """Which files go up and which stay behind, with the reason; every file to
    upload is checked readable here, before any network call. `weights` is
    what `check_output_dir` found. Unless `include_local_paths`, the run's
    paperwork goes up without local paths, and nothing that goes up may name
    one (publication.py)."""
    directory = Path(directory)
    plan = UploadPlan(card=card_action(directory, regenerate_card))
    published, forbidden = None, set()
    if not include_local_paths:
        published, found = public_paperwork(directory)
        forbidden = local_names(found, directory)
        plan.from_memory = {name: encoded(document) for name, document in published.items()}
    if plan.card == "write":
        plan.card_text = render_card(directory, repo_id, documents=published)
    entries = _walk(directory)
    if plan.card == "write":
        entries.setdefault(CARD_NAME, directory / CARD_NAME)
    for relative in sorted(entries):
        path = entries[relative]
        reason = _skip_reason(relative)
        if reason is None and relative == CARD_NAME and plan.card == "write":
            plan.upload.append({"path": relative, "size": len(plan.card_text.encode("utf-8"))})
            continue
        if reason is None and relative in plan.from_memory:
            _readable_file(path, relative, directory)
            plan.upload.append({"path": relative, "size": len(plan.from_memory[relative]), "local_paths": "removed"})
            continue
        if reason is None:
            size, target = _readable_file(path, relative, directory)
            entry = {"path": relative, "size": size}
            if target is not None:
                entry["link_to"] = target
            plan.upload.append(entry)
            continue
        try:
            size = path.lstat().st_size
        except OSError:
            size = 0
        plan.skip.append({"path": relative, "size": size, "reason": reason})
    _check_weights_planned(directory, weights, plan)
    if forbidden:
        check_published(_published_texts(directory, plan), forbidden)
    return plan


def _published_texts(directory: Path, plan: UploadPlan) -> dict[str, str]:
    """Everything the plan sends but the weights, as text: what a local name must not be in."""
    texts = {}
    for entry in plan.upload:
        name = entry["path"]
        if name.endswith(".safetensors"):
            continue
        if name == CARD_NAME and plan.card == "write":
            texts[name] = plan.card_text
        elif name in plan.from_memory:
            texts[name] = plan.from_memory[name].decode("utf-8")
        else:
            texts[name] = (directory / name).read_bytes().decode("utf-8", errors="replace")
    return texts


def _check_weights_planned(directory: Path, weights: Checkpoint, plan: UploadPlan) -> None:
    """Every weight file the checkpoint is read from goes up: never a repo
    without its weights."""
    uploaded = {entry["path"] for entry in plan.upload}
    missing = sorted({info.file.name for info in weights.tensors.values()} - uploaded)
    if missing:
        raise MduError(f"{directory}: the weights in {printable(', '.join(missing))} would not be uploaded "
                       f"({_reason_of(plan, missing[0])}); rename or replace them, then push again")


def _reason_of(plan: UploadPlan, path: str) -> str:
    return next((entry["reason"] for entry in plan.skip if entry["path"] == path), "not planned")


def stale_files(remote: list[str], plan: UploadPlan) -> list[str]:
    """Files of the revision that describe a model and that this upload does
    not replace: they would mix with the new model (a stale model.safetensors
    beside a new index is what transformers loads first)."""
    uploaded = {entry["path"] for entry in plan.upload}
    return sorted(path for path in remote
                  if "/" not in path and path not in uploaded and path != CARD_NAME and _matches(path, MANAGED_ON_HUB))


def _token(explicit: Optional[str]) -> str:
    from huggingface_hub import get_token

    token = explicit or get_token()
    if not token:
        raise MduError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
    return token


def _hub_failure(err: Exception, repo_id: str, timeout: float) -> MduError:
    """One line per kind of failure, each saying what to do."""
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    from mdu_cli.io.hub_session import is_timeout

    namespace = repo_id.split("/")[0]
    if is_timeout(err):
        return MduError(f"the Hub did not answer within {timeout:g} s; check the connection (or raise --timeout) "
                        "and run the same command again: it resumes")
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return MduError("the Hub rejected the token (401); log in again with `hf auth login` or pass a valid "
                            "--token")
        if status == 403:
            return MduError(f"the token may not write to {repo_id} (403); use a token with write access to the "
                            f"{namespace} namespace")
        if status == 404:
            return MduError(f"{namespace} is not a namespace you can create repositories in (404); check the "
                            "owner part of --repo-id")
        if status == 429:
            return MduError("the Hub is rate-limiting this account (429); wait a few minutes and run the same "
                            "command again: it resumes")
        return MduError(f"the Hub answered {status} for {repo_id}; run the same command again, or check "
                        "https://status.huggingface.co")
    if isinstance(err, (requests.ConnectionError, OSError)):
        return MduError("could not reach the Hub (network error); check the connection and run the same command "
                        "again: it resumes")
    return MduError(f"upload to {repo_id} failed ({type(err).__name__}); run the same command again")


@dataclass
class PushResult:
    repo_url: str
    commit_url: Optional[str]
    pr_url: Optional[str]
    plan: UploadPlan

    def as_dict(self) -> dict:
        return {"repo_url": self.repo_url, "commit_url": self.commit_url, "pr_url": self.pr_url,
                **self.plan.as_dict()}


def validate_repo_id(repo_id: str) -> Optional[str]:
    """What is wrong with an OWNER/NAME repo id, or None."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        return "must be OWNER/NAME"
    try:
        hub_validate(repo_id)
    except HFValidationError:
        return ("must be OWNER/NAME of letters, digits, '-', '_' and '.', at most 96 characters, without '--' "
                "or '..' and not starting or ending with '-' or '.'")
    return None


def push(directory: Path, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         create_pr: bool = False, commit_message: Optional[str] = None, token: Optional[str] = None,
         regenerate_card: bool = False, endpoint: Optional[str] = None,
         timeout: Optional[float] = None, include_local_paths: bool = False) -> PushResult:
    """Create the repo if needed, then one commit: the planned files, and the
    deletion of the revision's stale model files."""
    problem = validate_repo_id(repo_id)
    if problem:
        raise MduError(f"--repo-id {printable(repo_id)} {problem}")
    from mdu_cli.config.hub_names import check_revision

    check_revision(revision, "--revision")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUTHY:
        raise MduError("HF_HUB_OFFLINE is set, and mdu push needs the network; unset it (or use --dry-run)")
    directory = Path(directory)
    run, weights = check_output_dir(directory)
    plan = plan_upload(directory, weights, regenerate_card, repo_id, include_local_paths)
    token = _token(token)
    if not run["base_model"].get("is_hub"):
        log.info("Notice: the base was a local checkpoint, so the card names no base_model")

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from mdu_cli.io.hub_session import bound_hub_requests

    seconds = bound_hub_requests(timeout)
    additions = []
    for entry in plan.upload:
        # The card is sent from memory: the local directory is an input, never rewritten.
        if entry["path"] == CARD_NAME and plan.card == "write":
            content = plan.card_text.encode("utf-8")
        else:
            content = plan.from_memory.get(entry["path"], str(directory / entry["path"]))
        additions.append(CommitOperationAdd(path_in_repo=entry["path"], path_or_fileobj=content))
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    base = run["base_model"].get("id") if run["base_model"].get("is_hub") or include_local_paths \
        else "a local checkpoint"
    message = commit_message or _commit_message(run, base)
    try:
        repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        plan.delete = stale_files(api.list_repo_files(repo_id, revision=revision), plan)
        commit = api.create_commit(
            repo_id=repo_id,
            operations=[*additions, *(CommitOperationDelete(path_in_repo=path) for path in plan.delete)],
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
    except MduError:
        raise
    except Exception as err:  # the client raises many types; each becomes one line
        if os.environ.get("MDU_DEBUG"):
            raise
        raise _hub_failure(err, repo_id, seconds) from None
    return PushResult(repo_url=repo_url, commit_url=getattr(commit, "commit_url", None),
                      pr_url=getattr(commit, "pr_url", None), plan=plan)


def _commit_message(run: dict, base: str) -> str:
    """`Upload <base> unlearned with mdu (mdu-tau2)`: the method and its knobs, as in the default output name."""
    from mdu_cli.methods import method_of_record

    method = method_of_record(run)
    if not method.unlearns:
        return f"Upload {base} fine-tuned with mdu"
    return f"Upload {base} unlearned with mdu ({method.settings(run['config'])})"
