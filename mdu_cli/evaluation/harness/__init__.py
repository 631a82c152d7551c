"""lm-evaluation-harness on masked diffusion LMs (`mdu eval --tasks`, and the
`mdu` model of lm-eval: `model.py`).

lm-eval is an optional extra (`pip install 'mdu-cli[lm-eval]'`). This module
imports neither it nor torch, so that the command can say what is missing,
and which task names are unknown, before any weights load.
"""

from __future__ import annotations

import difflib
import functools
from typing import Optional

from mdu_cli.errors import ConfigError, MduError

INSTALL_HINT = "pip install 'mdu-cli[lm-eval]' (lm-eval 0.4.x with datasets < 5)"


def require_lm_eval() -> str:
    """lm-eval's version; a one-line error saying how to install it when it
    is missing or cannot be imported beside this project."""
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM  # noqa: F401  the API the mdu model subclasses
    except ImportError as err:
        raise MduError(f"--tasks needs lm-evaluation-harness, which is not installed or does not import "
                       f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else err!r}); "
                       f"install it with {INSTALL_HINT}") from None
    from importlib.metadata import version

    try:
        return version("lm_eval")
    except Exception:  # an editable or vendored copy without metadata
        return getattr(lm_eval, "__version__", "unknown")


def task_manager(include_path: Optional[str]):
    """lm-eval's index of its tasks and the user's: built once per folder and
    process (it reads some 15,000 task files, about six seconds)."""
    from pathlib import Path

    if include_path and not Path(include_path).is_dir():
        raise MduError(f"--include-path {include_path}: no such directory; give the folder of your task YAMLs")
    return _manager(str(Path(include_path).resolve()) if include_path else None)


@functools.lru_cache(maxsize=4)
def _manager(include_path: Optional[str]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], manager) -> list[str]:
    """The task names, each known to lm-eval (its own and --include-path's);
    an unknown one is a usage error naming the closest."""
    known = manager.all_tasks
    resolved = []
    for name in tasks:
        matched = manager.match_tasks([name])
        if not matched:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise ConfigError(f"--tasks: lm-eval knows no task {name!r}{hint}; `lm_eval ls tasks` lists them, "
                              "--include-path adds your own")
        resolved += [m for m in matched if m not in resolved]
    return resolved


def parse_tasks(value: str) -> list[str]:
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give task names separated by commas, e.g. --tasks mmlu,truthfulqa_mc1")
    return tasks
