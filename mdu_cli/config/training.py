"""The one typed configuration of an `mdu unlearn` run.

Filled from three layers, later ones winning: the defaults below, a YAML file
(`--config run.yaml`), and the flags the user typed. Validated once, here, and
written into `mdu_run.json` so that a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from mdu_cli.config.choices import (
    BATCH_ACCOUNTINGS,
    DEVICES,
    DTYPES,
    FAMILIES,
    KL_DIRECTIONS,
    OPTIMIZERS,
    UNLEARN_METHODS,
)
from mdu_cli.config.hub_names import check_revision, is_hub_data
from mdu_cli.config.trackers import parse_trackers
from mdu_cli.errors import ConfigError
from mdu_cli.methods import METHODS as METHOD_REGISTRY

# "finetune" is plain MDLM fine-tuning (`mdu finetune`): the same loop, no anchor.
METHODS = UNLEARN_METHODS + ("finetune",)
# Options of `mdu unlearn` that mean nothing to `mdu finetune`: the forget
# side, and every method's own knobs (each registry entry names its options).
UNLEARN_ONLY = ("forget", "retain", "method", "alpha", "batch_accounting",
                *(option for method in METHOD_REGISTRY.values() for option in method.options))
MAX_STEPS = 10_000_000
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class UnlearnConfig:
    # What to unlearn from what.
    model: Optional[str] = None
    forget: Optional[str] = None
    retain: Optional[str] = None
    out: Optional[str] = None
    overwrite: bool = False
    # How to load it.
    family: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    chat_template: Optional[str] = None
    max_length: int = 512
    # The objective (docs/method.md section 2), or a baseline.
    method: str = "mdu"
    npo_beta: float = 0.1
    tau: float = 1.0
    eta: float = 0.0
    kl: str = "forward"
    alpha: Optional[float] = None  # None: 1.0 with a retain file, 0.0 without
    batch_accounting: str = "separate"
    # The optimisation. optimizer "auto": torch's AdamW for fp32 weights, a
    # precision-safe AdamW for bf16 ones (mdu_cli/optimizers.py).
    optimizer: str = "auto"
    lr: float = 1e-5
    # No decay by default: decay would shrink every weight, including the ones
    # the forget set never touches, which is change the user did not ask for.
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 5
    max_steps: Optional[int] = None
    batch_size: int = 4
    grad_accum: int = 4
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    gradient_checkpointing: bool = False
    # Keep the frozen anchor of full MDU/NPO in host memory, each block moved to
    # the device for its forward only: the weights' size less on the GPU.
    anchor_offload: bool = False
    # Step each parameter inside backward and free its gradient at once
    # (mdu_cli/optimizers.py): no full set of gradients, at the price of one
    # backward per step and no global-norm clipping.
    optimizer_in_backward: bool = False
    # LoRA: the anchor is the same model with the adapter off, so no second copy.
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: Optional[str] = None  # comma-separated layer names; default: every linear layer in the blocks
    save_adapter: bool = False
    # Watching the run: trackers (comma-separated names), where their files go,
    # and the periodic probe of answer probability on a few records.
    report_to: Optional[str] = None
    logging_dir: Optional[str] = None  # default: <out>-logs beside the output
    eval_every: Optional[int] = None
    eval_records: int = 16
    # Resumable state beside the output every N optimizer steps; --resume continues it.
    save_every: Optional[int] = None
    resume: bool = False
    # The YAML file the options came from (set by the command, never by the
    # file): an input that --overwrite must not delete.
    config_file: Optional[str] = None

    def resolved(self) -> "UnlearnConfig":
        """Fill the values that depend on others, then validate."""
        alpha = self.alpha
        if alpha is None:
            alpha = 1.0 if self.retain else 0.0
        cfg = dataclasses.replace(self, alpha=alpha)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(option: str, problem: str) -> ConfigError:
            return ConfigError(f"--{option.replace('_', '-')} {problem}")

        if not self.model:
            raise bad("model", "is required: a local checkpoint directory or a Hub model id")
        check_revision(self.revision, "--revision")
        if not self.forget:
            if self.method == "finetune":
                raise ConfigError("--data is required: the JSONL or JSON file of records to train on")
            raise bad("forget", "is required: the JSONL or JSON file of records to unlearn")
        for name, choices in (("family", FAMILIES), ("kl", KL_DIRECTIONS), ("device", DEVICES), ("dtype", DTYPES),
                              ("method", METHODS),
                              ("batch_accounting", BATCH_ACCOUNTINGS), ("optimizer", OPTIMIZERS)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise bad(name, f"must be one of {', '.join(choices)} (got {value!r})")
        for name in ("tau", "eta", "alpha", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "npo_beta",
                     "lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise bad(name, f"must be a finite number (got {value!r})")
        if self.tau < 0:
            raise bad("tau", f"must be >= 0 (got {self.tau}); tau = 0 pulls toward the uniform distribution")
        if self.npo_beta <= 0:
            raise bad("npo_beta", f"must be > 0 (got {self.npo_beta})")
        if self.alpha < 0:
            raise bad("alpha", f"must be >= 0 (got {self.alpha})")
        if self.lr <= 0:
            raise bad("lr", f"must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be >= 0 (got {self.weight_decay})")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", f"must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", f"must be >= 0, where 0 turns clipping off (got {self.max_grad_norm})")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "lora_r", "eval_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, f"must be a whole number >= 1 (got {value!r})")
        for name in ("save_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise bad(name, f"must be a whole number >= 1 (got {value!r})")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise bad("max_steps", f"must be a whole number >= 1 (got {self.max_steps!r})")
        # The plan of steps is built up front: a run of billions of steps would
        # fill the memory before the first one.
        if self.max_steps is not None and self.max_steps > MAX_STEPS:
            raise bad("max_steps", f"must be at most {MAX_STEPS:,} (got {self.max_steps:,})")
        if self.epochs > MAX_STEPS:
            raise bad("epochs", f"must be at most {MAX_STEPS:,} (got {self.epochs:,})")
        # Each process seeds generators at seed + a few + 1000 x rank; torch takes 64 bits.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**62:
            raise bad("seed", f"must be a whole number from 0 to 2**62 (got {self.seed!r})")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise bad("lora_alpha", f"must be > 0 (got {self.lora_alpha!r})")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", f"must be in [0, 1) (got {self.lora_dropout!r})")
        if self.anchor_offload and (self.lora or self.method not in ("mdu", "npo")):
            raise bad("anchor_offload", "applies to full MDU and NPO, whose anchor is a frozen copy of the weights "
                      "(with --lora the anchor is the model itself with the adapter off)")
        if self.optimizer_in_backward:
            self._check_in_backward(bad)
        if self.save_adapter and not self.lora:
            raise bad("save_adapter", "needs --lora")
        self.shard_size_bytes  # raises on a size save_pretrained would refuse after training
        parse_trackers(self.report_to)  # a tracker that is not installed fails now, not after loading
        if self.batch_accounting == "joint" and not (self.retain and self.alpha > 0):
            raise bad("batch_accounting", "joint mixes forget and retain rows; it needs --retain (and --alpha > 0)")
        if self.method == "finetune" and self.retain:
            raise ConfigError("--retain does not apply to `mdu finetune`: put every record to train on in --data")
        if self.alpha > 0 and not self.retain:
            raise bad("alpha", f"is {self.alpha} but no --retain file is given; add --retain FILE or drop --alpha")

    def _check_in_backward(self, bad) -> None:
        """--optimizer-in-backward steps every parameter during the one
        backward of a step: the options that need a whole step's gradient at
        once cannot apply, and are refused rather than quietly changed."""
        why = "with --optimizer-in-backward each parameter steps as soon as its gradient is ready"
        if self.grad_accum != 1:
            raise bad("grad_accum", f"must be 1 {why}, so nothing can accumulate over micro-batches; "
                      f"raise --batch-size instead (--batch-size {self.batch_size * self.grad_accum} "
                      "--grad-accum 1 keeps the rows a step)")
        if self.max_grad_norm != 0:
            raise bad("max_grad_norm", f"must be 0 {why}, before the global norm is known; pass --max-grad-norm 0 "
                      "(the norm is still logged)")
        if self.optimizer not in ("auto", "adamw-kahan"):
            raise bad("optimizer", f"{self.optimizer} cannot step inside backward; use adamw-kahan (or auto)")
        if self.dtype == "fp16":
            raise bad("dtype", "fp16 scales the loss and unscales whole gradients before the step, which "
                      "--optimizer-in-backward cannot do; use bf16 or fp32")

    @property
    def shard_size_bytes(self) -> int:
        """--max-shard-size in bytes: "5GB", "500MB", "2GiB", "1.5GB" or a plain
        number of bytes. Parsed here, and handed to the writer as a number, so
        a bad value fails before training rather than at the save."""
        match = _SIZE.fullmatch(str(self.max_shard_size).strip())
        size = int(float(match["number"]) * _SIZE_UNITS[match["unit"].upper()]) if match else 0
        if size <= 0:
            raise ConfigError("--max-shard-size must be a size such as 5GB, 500MB or 2GiB "
                              f"(got {self.max_shard_size!r})")
        return size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def option_names() -> list[str]:
    return [f.name for f in fields(UnlearnConfig) if f.name not in NOT_FROM_FILE]


# Fields a YAML file may not set: where the file itself is.
NOT_FROM_FILE = ("config_file",)
# A config file needs no aliases at all; a few are allowed, many are an attack
# (a "billion laughs" file expands aliases of aliases exponentially).
MAX_ALIASES = 32


def _kind(name: str) -> type:
    """The scalar type a field holds: bool, int, float or str."""
    hint = typing.get_type_hints(UnlearnConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(UnlearnConfig)[name])


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


def _typed_value(loader: yaml.SafeLoader, path: Path, line: int, key: str, name: str, node) -> Any:
    """The value of one option, of the field's type, or a ConfigError naming
    the file, the line and what to write instead. Only scalars are read: a
    list or a mapping is refused without being built (or expanded)."""
    kind, flag = _kind(name), f"{key!s}"
    where = f"{path}:{line}: {flag}"
    if not isinstance(node, yaml.ScalarNode):
        shape = "list" if isinstance(node, yaml.SequenceNode) else "mapping"
        raise ConfigError(f"{where} must be a single {_KIND_WORDS[kind]}, got a {shape}")
    value = loader.construct_object(node)
    plain = node.style is None
    if value is None:
        if _optional(name):
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
    known = set(option_names())
    if command == "finetune":
        known = (known - set(UNLEARN_ONLY)) | {"data"}
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
        # `data` is what `mdu finetune` calls the one file it trains on.
        field_name = "forget" if name == "data" else name
        options[field_name] = _typed_value(loader, path, line, key, field_name, value_node)
    return options


# The options that name a local file or folder: in a YAML file, relative to the file.
PATH_OPTIONS = ("forget", "retain", "chat_template", "out", "logging_dir")


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


def build_config(file_options: dict[str, Any], flag_options: dict[str, Any]) -> UnlearnConfig:
    """Defaults < YAML file < flags, then resolve and validate."""
    merged = {**file_options, **flag_options}
    try:
        cfg = UnlearnConfig(**merged)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    for name in ("tau", "eta", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "npo_beta"):
        value = getattr(cfg, name)
        if isinstance(value, int) and not isinstance(value, bool):
            cfg = dataclasses.replace(cfg, **{name: float(value)})
    if isinstance(cfg.alpha, int) and not isinstance(cfg.alpha, bool):
        cfg = dataclasses.replace(cfg, alpha=float(cfg.alpha))
    return cfg.resolved()
