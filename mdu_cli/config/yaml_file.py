"""Options from a YAML file (`--config run.yaml`): keys spelled as flags or as
fields, every value of its field's type, paths relative to the file. Strict,
so that a typo never falls back to a default or turns into its opposite."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from mdu_cli.config.fields import path_fields
from mdu_cli.config.hub_names import is_hub_data
from mdu_cli.config.training import CONFIGS, is_optional, kind_of
from mdu_cli.errors import ConfigError


def option_names(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.name not in NOT_FROM_FILE]


# Fields a YAML file may not set: where the file itself is.
NOT_FROM_FILE = ("config_file",)
# A config file needs no aliases at all; a few are allowed, many are an attack
# (a "billion laughs" file expands aliases of aliases exponentially).
MAX_ALIASES = 32


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting aliases as it composes the document."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self.name}:{mark.line + 1}: more than {MAX_ALIASES} YAML aliases; "
                                  "write the options out plainly")
        return super().compose_node(parent, index)


def _typed_value(cls, loader: yaml.SafeLoader, path: Path, line: int, key: str, name: str, node) -> Any:
    """The value of one option, of the field's type, or a ConfigError naming
    the file, the line and what to write instead. Only scalars are read: a
    list or a mapping is refused without being built (or expanded)."""
    kind, flag = kind_of(cls, name), f"{key!s}"
    where = f"{path}:{line}: {flag}"
    if not isinstance(node, yaml.ScalarNode):
        shape = "list" if isinstance(node, yaml.SequenceNode) else "mapping"
        raise ConfigError(f"{where} must be a single {_KIND_WORDS[kind]}, got a {shape}")
    value = loader.construct_object(node)
    plain = node.style is None
    if value is None:
        if is_optional(cls, name):
            return None
        raise ConfigError(f"{where} must be a {_KIND_WORDS[kind]}, got nothing (null)")
    if kind is bool:
        if isinstance(value, bool):
            return value
        got = f"the string {node.value!r}" if isinstance(value, str) else f"{node.value}"
        raise ConfigError(f"{where} must be true or false (a YAML boolean, unquoted), got {got}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be a whole number, got {_describe(value, node)}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads an unquoted 1e-5 (no dot) as text; it is what people write.
        if isinstance(value, str) and plain:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {_describe(value, node)}")
    # Text: an unquoted scalar that YAML took for a number (a revision such as
    # 0123, a shard size such as 1000000) keeps the characters as written.
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be text, got the boolean {node.value}; quote it if you meant the text")
    return value if isinstance(value, str) else node.value


_KIND_WORDS = {bool: "boolean", int: "whole number", float: "number", str: "text value"}


def _describe(value, node) -> str:
    if isinstance(value, bool):
        return f"the boolean {node.value}"
    if isinstance(value, str):
        return f"the text {node.value[:40]!r}"
    return f"{node.value[:40]}"


def _options(loader: _BoundedLoader, path: Path, command: str) -> dict[str, Any]:
    document = loader.get_single_node()
    if document is None:
        return {}
    if not isinstance(document, yaml.MappingNode):
        raise ConfigError(f"{path}: expected a mapping of option: value, one per line")
    cls = CONFIGS[command]
    known = set(option_names(cls))
    options: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for key_node, value_node in document.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            raise ConfigError(f"{path}:{line}: an option name must be plain text")
        key = key_node.value
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}:{line}: unknown option {key!r}; the options are those of `mdu {command} --help`")
        if name in seen:
            raise ConfigError(f"{path}:{line}: {key} is set twice (also on line {seen[name]}); keep one")
        seen[name] = line
        options[name] = _typed_value(cls, loader, path, line, key, name, value_node)
    return options


# The options that name a local file or folder: in a YAML file, relative to the file.
# (The model is either a folder beside the file or a Hub id: see below.)
PATH_OPTIONS = tuple(dict.fromkeys(name for cls in CONFIGS.values() for name in path_fields(cls)
                                   if name not in ("model", *NOT_FROM_FILE)))


def read_yaml(path: str | Path, command: str = "unlearn") -> dict[str, Any]:
    """Options from a YAML file, keys spelled as flags (`max-steps`) or as
    fields (`max_steps`). Unknown and repeated keys are errors, and so is a
    value of the wrong type (`overwrite: "false"` is text, not false): a typo
    must not silently fall back to a default, or turn into its opposite."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"--config {path}: is a directory; give a YAML file")
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise ConfigError(f"--config {path}: not a regular file; give a YAML file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text; save it as UTF-8") from None
    loader = _BoundedLoader(text)
    loader.name = str(path)
    try:
        options = _options(loader, path, command)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file; write one option per line") from None
    finally:
        loader.dispose()
    # Data and model paths in the file are relative to the file, which is what a
    # user who keeps run.yaml beside the data expects.
    for name in PATH_OPTIONS:
        value = options.get(name)
        if isinstance(value, str) and not Path(value).is_absolute() and not is_hub_data(value):
            options[name] = os.path.normpath(path.parent / value)
    # A model is either a directory (relative to the file, like the data) or a
    # Hub id; only an existing directory beside the file is taken as a path.
    model = options.get("model")
    if isinstance(model, str) and not Path(model).is_absolute() and (path.parent / model).is_dir():
        options["model"] = os.path.normpath(path.parent / model)
    return options
