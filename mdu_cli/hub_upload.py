"""Publishing an unlearned checkpoint to the Hugging Face Hub: the model and its
paperwork, never the data.

What goes up is decided by an allow-list (`plan_upload`), shown in full by
`--dry-run`, and enforced by passing exactly the planned files to one
`upload_folder` call. Every Hub failure becomes one line saying what to do;
the token is never printed, logged or written.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mdu_cli.checkpoint import TOKENIZER_FILES
from mdu_cli.errors import MduError
from mdu_cli.model_card import CARD_NAME, card_action, render_card
from mdu_cli.report_format import write_text_atomic
from mdu_cli.safetensors_reader import open_directory

# The model and its paperwork. Anything else in the directory stays behind.
ALLOWED = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "adapter_config.json", *TOKENIZER_FILES, "*.py",
    CARD_NAME, "mdu_run.json", "delta_report.json", "delta_report.md", "eval.json",
)
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".xlsx", ".pkl", ".pickle",
                 ".pt", ".bin", ".npy", ".npz", ".gz", ".zip", ".tar")
TRUTHY = ("1", "true", "yes", "on")
log = logging.getLogger("mdu")


@dataclass
class UploadPlan:
    upload: list[dict] = field(default_factory=list)   # {"path", "size"}
    skip: list[dict] = field(default_factory=list)     # {"path", "size", "reason"}
    card: str = "keep"                                 # "write" or "keep"
    card_text: Optional[str] = None                    # the card to write, when card == "write"

    def as_dict(self) -> dict:
        return {"upload": self.upload, "skip": self.skip}


def _skip_reason(relative: str) -> Optional[str]:
    parts = relative.split("/")
    if any(part.startswith(".") for part in parts):
        return "hidden file"
    if len(parts) > 1:
        return "inside a subdirectory: not part of the model"
    name = parts[0]
    if name == "train_log.jsonl":
        return "training log: stays local"
    if any(fnmatch.fnmatch(name, pattern) for pattern in ALLOWED):
        return None
    if name.lower().endswith(DATA_SUFFIXES):
        return "may hold data or pickles: never uploaded"
    return "not on the upload allow-list"


def check_output_dir(directory: Path) -> dict:
    """Refuse anything but a complete `mdu unlearn` output, before any network call."""
    import json

    def incomplete(problem: str) -> MduError:
        return MduError(f"{directory} is not a complete `mdu unlearn` output ({problem}); "
                        "push the directory that `mdu unlearn --out` wrote")

    if not directory.is_dir():
        raise MduError(f"{directory}: no such directory")
    try:
        run = json.loads((directory / "mdu_run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise incomplete("no mdu_run.json") from None
    except (OSError, ValueError):
        raise incomplete("mdu_run.json is not valid JSON") from None
    if not isinstance(run, dict) or run.get("tool") != "mdu" or "base_model" not in run:
        raise incomplete("mdu_run.json was not written by mdu unlearn")
    if not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise incomplete("no config.json (nor adapter_config.json)")
    try:
        weights = open_directory(directory, str(directory))
    except MduError as err:
        raise incomplete(f"weights unreadable: {err}") from None
    if not weights.tensors:
        raise incomplete("the weights hold no tensors")
    return run


def plan_upload(directory: Path, regenerate_card: bool = False, repo_id: Optional[str] = None) -> UploadPlan:
    directory = Path(directory)
    plan = UploadPlan(card=card_action(directory, regenerate_card))
    if plan.card == "write":
        plan.card_text = render_card(directory, repo_id)
    card_size = len(plan.card_text.encode("utf-8")) if plan.card_text is not None else None
    files = sorted(p for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    relatives = {p.relative_to(directory).as_posix(): p for p in files}
    if plan.card == "write":
        relatives.setdefault(CARD_NAME, directory / CARD_NAME)
    for relative in sorted(relatives):
        path = relatives[relative]
        size = card_size if relative == CARD_NAME and card_size is not None else path.stat().st_size
        reason = _skip_reason(relative)
        if reason is None and path.is_symlink():
            reason = "symbolic link: not followed"
        if reason:
            plan.skip.append({"path": relative, "size": size, "reason": reason})
        else:
            plan.upload.append({"path": relative, "size": size})
    return plan


def _token(explicit: Optional[str]) -> str:
    from huggingface_hub import get_token

    token = explicit or get_token()
    if not token:
        raise MduError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
    return token


def _hub_failure(err: Exception, repo_id: str) -> MduError:
    """One line per kind of failure, each saying what to do."""
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    namespace = repo_id.split("/")[0]
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return MduError("the Hub rejected the token (401); log in again with `hf auth login` or pass a valid --token")
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
    if isinstance(err, (requests.ConnectionError, requests.Timeout, OSError)):
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


def push(directory: Path, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         create_pr: bool = False, commit_message: Optional[str] = None, token: Optional[str] = None,
         regenerate_card: bool = False, endpoint: Optional[str] = None) -> PushResult:
    """Create the repo if needed and upload the planned files in one commit."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUTHY:
        raise MduError("HF_HUB_OFFLINE is set, and mdu push needs the network; unset it (or use --dry-run)")
    directory = Path(directory)
    run = check_output_dir(directory)
    token = _token(token)
    if not run["base_model"].get("is_hub"):
        log.info("Notice: the base was a local checkpoint, so the card names no base_model")
    plan = plan_upload(directory, regenerate_card, repo_id)
    if plan.card == "write":
        write_text_atomic(directory / CARD_NAME, plan.card_text)

    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    message = commit_message or f"Upload {run['base_model']['id']} unlearned with mdu (tau={run['config']['tau']})"
    try:
        repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=directory,
            repo_id=repo_id,
            revision=revision,
            create_pr=create_pr,
            commit_message=message,
            allow_patterns=[entry["path"] for entry in plan.upload],
        )
    except MduError:
        raise
    except Exception as err:  # the client raises many types; each becomes one line
        if os.environ.get("MDU_DEBUG"):
            raise
        raise _hub_failure(err, repo_id) from None
    return PushResult(repo_url=repo_url, commit_url=getattr(commit, "commit_url", None),
                      pr_url=getattr(commit, "pr_url", None), plan=plan)
