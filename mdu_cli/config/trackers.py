"""--report-to: the experiment trackers mdu can feed (through accelerate),
each an optional extra; checked before anything loads."""

from __future__ import annotations

import importlib.util
from typing import Optional

from mdu_cli.config.choices import TRACKERS
from mdu_cli.errors import ConfigError

# The module each tracker needs, and the extra that installs it.
_TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def parse_trackers(value: Optional[str]) -> list[str]:
    """The tracker names of --report-to, each checked to be known and installed."""
    if not value:
        return []
    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name!r} is not a tracker mdu supports; use {', '.join(TRACKERS)}")
        if importlib.util.find_spec(_TRACKER_MODULES[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {name} package; pip install 'mdu-cli[{name}]'")
    return list(dict.fromkeys(names))
