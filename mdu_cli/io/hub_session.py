"""A timeout on every request mdu makes to the Hugging Face Hub.

huggingface_hub (0.x, on `requests`) sends most API calls (`create_repo`,
`create_commit`, `repo_info`, ...) without a timeout, so a Hub that accepts
the connection and never answers would hang a command forever. mdu installs a
session factory whose sessions give every request that names no timeout of
its own this one: `--timeout` where a command has it, else the environment
variable MDU_HUB_TIMEOUT, else DEFAULT_TIMEOUT_S. It bounds the connection and
each wait for data, not a whole upload: a large file that keeps moving is
never cut off.

The same sessions read every answer before the library does: the strings a
server sends that huggingface_hub turns into cache paths (the ETag names a
blob, X-Repo-Commit and a repo's `sha` name a snapshot folder, a sibling's
`rfilename` a file in it) must be plain names, or the request fails with
`UnsafeHubAnswer` before anything is written. Revisions the user gives are
checked by `config.hub_names.check_revision` before they reach the library, which writes them
into `refs/<revision>`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

from mdu_cli.errors import ConfigError, MduError

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_VARIABLE = "MDU_HUB_TIMEOUT"

_installed: Optional[float] = None


def hub_timeout(explicit: Optional[float] = None) -> float:
    """The timeout in seconds: the explicit value, else MDU_HUB_TIMEOUT, else the default."""
    if explicit is not None:
        value, source = explicit, "--timeout"
    elif os.environ.get(TIMEOUT_VARIABLE):
        source = TIMEOUT_VARIABLE
        try:
            value = float(os.environ[TIMEOUT_VARIABLE])
        except ValueError:
            raise ConfigError(f"{TIMEOUT_VARIABLE}={os.environ[TIMEOUT_VARIABLE]!r} is not a number of "
                              "seconds") from None
    else:
        return DEFAULT_TIMEOUT_S
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source} must be a number of seconds > 0 (got {value})")
    return value


class UnsafeHubAnswer(MduError):
    """A Hub answer that would place a file outside the cache."""


# An ETag names a blob file: hex digests and the like, optionally quoted or weak.
_ETAG = re.compile(r'(?:W/)?"?[0-9A-Za-z_-]{1,128}"?')
_COMMIT = re.compile(r"[0-9a-f]{40}")
_API_INFO = re.compile(r"/api/(?:models|datasets|spaces)/[^?]+")


def _plain_relative(path) -> bool:
    return (isinstance(path, str) and bool(path) and "\\" not in path and not path.startswith("/")
            and all(part not in ("", ".", "..") for part in path.split("/")))


def check_answer(method: str, url: str, response) -> None:
    """Refuse an answer whose path-making strings are not plain (see the module docstring)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host, path = parsed.netloc, parsed.path
    if response.headers.get("Content-Type", "").startswith("text/html") and \
            (path.startswith("/api/") or (method.upper() == "HEAD" and "/resolve/" in path)):
        raise UnsafeHubAnswer(f"{host} answered with a web page, not the Hub's API (a captive portal, a proxy's "
                              "login page, or HF_ENDPOINT pointing elsewhere); log in to the network or check "
                              "HF_ENDPOINT, and run again")
    for header in ("ETag", "X-Linked-Etag"):
        value = response.headers.get(header)
        if value is not None and not _ETAG.fullmatch(value.strip()):
            raise UnsafeHubAnswer(f"the Hub at {host} answered with the {header} {value[:80]!r}, which would "
                                  "name a file outside the cache; nothing was written. Check HF_ENDPOINT")
    commit = response.headers.get("X-Repo-Commit")
    if commit is not None and not _COMMIT.fullmatch(commit.strip()):
        raise UnsafeHubAnswer(f"the Hub at {host} answered with the commit {commit[:80]!r}, which is not a commit "
                              "hash; nothing was written. Check HF_ENDPOINT")
    if method.upper() != "GET" or not _API_INFO.fullmatch(path) or \
            "json" not in response.headers.get("Content-Type", ""):
        return
    try:
        info = response.json()
    except ValueError:
        return  # not JSON after all: the library reports it
    if not isinstance(info, dict):
        return
    sha = info.get("sha")
    if sha is not None and not (isinstance(sha, str) and _COMMIT.fullmatch(sha)):
        raise UnsafeHubAnswer(f"the Hub at {host} named the commit {str(info['sha'])[:80]!r}, which is not a commit "
                              "hash; nothing was written. Check HF_ENDPOINT")
    for sibling in info.get("siblings") or []:
        name = sibling.get("rfilename") if isinstance(sibling, dict) else None
        if not _plain_relative(name):
            raise UnsafeHubAnswer(f"the Hub at {host} listed a file {str(name)[:80]!r} that would lie outside the "
                                  "repository's folder; nothing was written. Check HF_ENDPOINT")


def bound_hub_requests(explicit: Optional[float] = None) -> float:
    """Make every later Hub request of this process time out; returns the timeout."""
    global _installed
    timeout = hub_timeout(explicit)
    if _installed == timeout:
        return timeout
    from huggingface_hub import configure_http_backend

    try:  # the library's own factory keeps its request ids and offline mode
        from huggingface_hub.utils._http import _default_backend_factory as default_factory
    except ImportError:  # pragma: no cover - a layout this version range does not have
        import requests

        default_factory = requests.Session

    def factory():
        session = default_factory()
        send = session.request

        def request(method, url, *args, **kwargs):
            if kwargs.get("timeout") is None and len(args) < 7:  # timeout is the 7th after the url
                kwargs["timeout"] = timeout
            response = send(method, url, *args, **kwargs)
            check_answer(method, url, response)
            return response

        session.request = request
        return session

    configure_http_backend(backend_factory=factory)
    # Downloads and metadata requests name a timeout of their own (10 s by
    # default), which the session's fallback does not replace: set both, read
    # by huggingface_hub at each call, so that MDU_HUB_TIMEOUT bounds them too.
    from huggingface_hub import constants

    constants.HF_HUB_DOWNLOAD_TIMEOUT = timeout
    constants.HF_HUB_ETAG_TIMEOUT = timeout
    _installed = timeout
    return timeout


def unsafe_answer(err: BaseException) -> Optional[UnsafeHubAnswer]:
    """The UnsafeHubAnswer behind an error the Hub client raised, if there is one."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, UnsafeHubAnswer):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def http_status(err: BaseException) -> Optional[int]:
    """The HTTP status behind an error the Hub client raised (it wraps a
    refused HEAD as "not in the cache"), if there is one."""
    seen = 0
    while err is not None and seen < 8:
        response = getattr(err, "response", None)
        if response is not None and isinstance(getattr(response, "status_code", None), int):
            return response.status_code
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def download_failure(err: BaseException, name: str) -> Optional[str]:
    """What a failed model or data download means and what to do, for the
    failures both kinds share (an answer refused by `check_answer`, a
    timeout, a cache that cannot be written, a refusing HTTP status); None
    leaves the error to the caller's own names (no such repo, gated, ...).
    The Hub client wraps a refused HEAD as "not in the cache"
    (LocalEntryNotFoundError): its status is what happened."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if unsafe_answer(err) is not None:
        return f"{name}: {unsafe_answer(err)}"
    if is_timeout(err):
        return (f"{name}: the Hub did not answer within {hub_timeout():g} s; check the network, or set "
                "MDU_HUB_TIMEOUT to wait longer, and run the same command again")
    status = http_status(err)
    if isinstance(err, OSError) and err.errno is not None and status is None:
        return (f"{name}: cannot write the download into the Hugging Face cache ({err.strerror}); free some space "
                "or set HF_HOME to another disk, and run again")
    named = (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)
    if isinstance(err, LocalEntryNotFoundError) or not isinstance(err, named):
        return status_problem(status, name)
    return None


def status_problem(status: Optional[int], name: str) -> Optional[str]:
    """What a refused download means and what to do, by HTTP status: one table
    for data and model downloads (`mdu push` says the same for uploads)."""
    if status == 401:
        return (f"{name}: the Hub refused the request (401: no valid token, or a private repository); log in "
                "with `hf auth login` or set HF_TOKEN, and check the name")
    if status == 403:
        return f"{name}: the token has no access (403); request access on the Hub, or use a token that has it"
    if status == 429:
        return f"{name}: the Hub is rate-limiting this machine (429); wait a few minutes and run again"
    if status is not None and status >= 500:
        return f"{name}: the Hub failed ({status}); try again later"
    return None


def is_timeout(err: BaseException) -> bool:
    """Whether a request timed out, here or in the chain of errors behind this
    one (the Hub client rewraps errors: a timed-out download can surface as
    "not in the cache")."""
    import requests

    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (requests.Timeout, TimeoutError)):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def _hub_error(name: str, err: Exception) -> MduError:
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shared = download_failure(err, name)
    if shared:
        return MduError(shared)
    if isinstance(err, GatedRepoError):
        return MduError(f"{name}: the repository is gated; accept its terms on the Hub and log in (hf auth login)")
    if isinstance(err, RepositoryNotFoundError):
        return MduError(f"{name}: no such model on the Hub (or it is private); check the id or log in")
    if isinstance(err, RevisionNotFoundError):
        return MduError(f"{name}: no such revision on the Hub; check --revision")
    if isinstance(err, LocalEntryNotFoundError):
        return MduError(
            f"{name}: not a local directory and not in the Hugging Face cache while offline; "
            "check the path, or download it with network access first"
        )
    return MduError(f"{name}: could not fetch from the Hub ({type(err).__name__}); check the network and retry")


def snapshot(name: str, revision: Optional[str], patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError

    from mdu_cli.config.hub_names import check_revision

    check_revision(revision, "--revision")
    bound_hub_requests()
    try:
        return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=patterns))
    except HFValidationError:
        raise MduError(f"{name}: no such directory, and not a valid Hub model id; check the path or id") from None
    except Exception as err:  # the hub client raises many types; each becomes one line
        raise _hub_error(name, err) from None
