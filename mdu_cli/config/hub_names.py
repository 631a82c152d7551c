"""Hub names as the user writes them, checked without the network (and
without torch): a revision before it reaches huggingface_hub, which writes it
into refs/<revision> in the cache, and the `hf://` form of a data file."""

from __future__ import annotations

import re
from typing import Optional

from mdu_cli.errors import ConfigError

HUB_DATA_SCHEME = "hf://"


def is_hub_data(value) -> bool:
    return isinstance(value, str) and value.startswith(HUB_DATA_SCHEME)


_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_revision(revision: Optional[str], where: str) -> None:
    """A branch, tag or commit as git allows its name (the library writes it
    into refs/<revision> in the cache): ConfigError otherwise."""
    if revision is None:
        return
    problem = None
    if not isinstance(revision, str) or not revision:
        problem = "is empty"
    elif len(revision) > 256:
        problem = "is longer than 256 characters"
    elif _REF_FORBIDDEN.search(revision):
        problem = "holds a space, a control character or one of ~ ^ : ? * [ \\"
    elif ".." in revision or "//" in revision or "@{" in revision:
        problem = "holds '..', '//' or '@{'"
    elif revision.startswith(("/", "-")) or revision.endswith(("/", ".", ".lock")):
        problem = "starts with '/' or '-', or ends with '/', '.' or '.lock'"
    elif any(part.startswith(".") for part in revision.split("/")):
        problem = "has a part starting with '.'"
    if problem:
        raise ConfigError(f"{where} {revision!r} {problem}: not a branch, tag or commit name")
