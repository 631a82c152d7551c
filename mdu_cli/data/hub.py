"""Data files named by Hub id: `hf://datasets/OWNER/NAME/PATH[@REVISION]`.

Wherever `mdu` takes a data file (--forget, --retain, --data, the eval splits)
it also takes such a name, e.g. `hf://datasets/locuslab/TOFU/forget10.json`.
The file is fetched through huggingface_hub's cache (so HF_HUB_OFFLINE and
HF_HOME apply, and a second run reads the cache), with the Hub timeout of
`io.hub_session`. What was read is pinned by the resolved commit, which goes into
`mdu_run.json` and `eval.json` beside the file's sha256.

The revision may also be written after the repository name, as
huggingface_hub's file system does: `hf://datasets/OWNER/NAME@REVISION/PATH`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mdu_cli.errors import ConfigError, MduError

PREFIX = "hf://datasets/"
FORM = "hf://datasets/OWNER/NAME/PATH[@REVISION]"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub dataset repository, before or after fetching."""

    repo_id: str
    filename: str
    revision: Optional[str]          # as asked for (None: the default branch)
    local_path: Optional[Path] = None
    commit: Optional[str] = None     # what the revision resolved to

    @property
    def uri(self) -> str:
        return f"{PREFIX}{self.repo_id}/{self.filename}" + (f"@{self.revision}" if self.revision else "")

    def provenance(self) -> dict:
        return {"repo_id": self.repo_id, "repo_type": "dataset", "filename": self.filename,
                "revision": self.revision, "commit": self.commit}


def parse(value: str) -> HubFile:
    """Split a `hf://datasets/...` name, or raise a usage error saying the form."""
    if not value.startswith(PREFIX):
        raise ConfigError(f"{value}: only Hub datasets are read this way; write {FORM}")
    rest = value[len(PREFIX):]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not parts[2]:
        raise ConfigError(f"{value}: expected {FORM}, e.g. hf://datasets/locuslab/TOFU/forget10.json")
    owner, name, path = parts
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
    elif "@" in path:
        path, revision = path.rsplit("@", 1)
    if revision is not None and not revision:
        raise ConfigError(f"{value}: the revision after '@' is empty; drop the '@' or name a branch, tag or commit")
    if revision is not None and "@" in path:
        raise ConfigError(f"{value}: two revisions ('@' twice); name one branch, tag or commit")
    from mdu_cli.config.hub_names import check_revision

    check_revision(revision, f"{value}: the revision")
    for part in (owner, name):
        if not _NAME.fullmatch(part) or ".." in part or len(part) > 96:
            raise ConfigError(f"{value}: {part!r} is not a valid Hub owner or repository name")
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments) or "\\" in path:
        raise ConfigError(f"{value}: the file path inside the repository must be plain (no empty, '.' or '..' parts)")
    return HubFile(f"{owner}/{name}", path, revision)


def fetch(value: str) -> HubFile:
    """Download (or find in the cache) one dataset file; MduError on failure."""
    from huggingface_hub import hf_hub_download

    from mdu_cli.io.hub_session import bound_hub_requests

    wanted = parse(value)
    timeout = bound_hub_requests()
    try:
        # etag_timeout: the metadata request has its own timeout (10 s), which
        # the session's bound does not replace.
        local = Path(hf_hub_download(repo_id=wanted.repo_id, filename=wanted.filename, repo_type="dataset",
                                     revision=wanted.revision, etag_timeout=timeout))
    except Exception as err:  # the hub client raises many types; each becomes one line
        from huggingface_hub.utils import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        from mdu_cli.io.hub_session import download_failure

        shared = download_failure(err, value)
        if shared:
            raise MduError(shared) from None
        if isinstance(err, GatedRepoError):
            raise MduError(f"{value}: the dataset is gated; accept its terms on the Hub and log in") from None
        if isinstance(err, RepositoryNotFoundError):
            raise MduError(f"{value}: no such dataset on the Hub (or it is private); check the name") from None
        if isinstance(err, RevisionNotFoundError):
            raise MduError(f"{value}: no such revision in {wanted.repo_id}; check the part after '@'") from None
        if isinstance(err, LocalEntryNotFoundError):
            raise MduError(f"{value}: not in the Hugging Face cache, and the Hub is unreachable or HF_HUB_OFFLINE "
                           "is set; fetch it once with network access") from None
        if isinstance(err, EntryNotFoundError):
            raise MduError(f"{value}: no file {wanted.filename!r} in {wanted.repo_id}; check the path") from None
        raise MduError(f"{value}: could not fetch from the Hub ({type(err).__name__}); check the network "
                       "and retry") from None
    return HubFile(wanted.repo_id, wanted.filename, wanted.revision, local, _commit_of(local, wanted.filename))


def _commit_of(local: Path, filename: str) -> Optional[str]:
    """The commit a cached file belongs to: the cache keeps each file under
    snapshots/<commit>/<path in the repository>."""
    snapshot = local
    for _ in filename.split("/"):
        snapshot = snapshot.parent
    name = snapshot.name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None
