"""How a config field declares its option: the help text, the choices, and how
the command line shows its default, in the field's metadata. The commands
build their Click options from these (`commands/training_options.py`), the
YAML reader knows the fields, and `validate` checks the choices: each option
is declared once, here in the config."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any, Optional


def option(default: Any = None, help: Optional[str] = None, choices: Optional[tuple[str, ...]] = None,
           show_default: Optional[bool] = None, file: bool = False, path: bool = False, cli: bool = True) -> Any:
    """A config field and its command-line option.

    show_default: None shows the default when there is one (not for flags);
    file: the option names a local file (Click checks it is no directory);
    path: the value may name a local file or folder (a YAML file's are read
    relative to it; `mdu push` and the trackers never publish one);
    cli: False for fields a command sets itself (the YAML file's own path)."""
    metadata = {"help": help, "choices": choices, "show_default": show_default, "file": file,
                "path": path or file, "cli": cli}
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls, name: str) -> dataclasses.Field:
    for item in dataclasses.fields(cls):
        if item.name == name:
            return item
    raise KeyError(name)


def default_of(item: dataclasses.Field) -> Any:
    return None if item.default is MISSING else item.default


def path_fields(cls) -> tuple[str, ...]:
    """The fields of a config whose values may be local paths."""
    return tuple(item.name for item in dataclasses.fields(cls) if item.metadata.get("path"))
