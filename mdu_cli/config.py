"""The one typed configuration of an `mdu unlearn` run.

Filled from three layers, later ones winning: the defaults below, a YAML file
(`--config run.yaml`), and the flags the user typed. Validated once, here, and
written into `mdu_run.json` so that a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from mdu_cli.errors import ConfigError

FAMILIES = ("llada", "dream", "masked-lm")
KL_DIRECTIONS = ("forward", "reverse", "js")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bf16", "fp16", "fp32")
METHODS = ("mdu", "ga", "npo")


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
    # The objective (METHOD.md section 2), or a baseline.
    method: str = "mdu"
    npo_beta: float = 0.1
    tau: float = 1.0
    eta: float = 0.0
    kl: str = "forward"
    alpha: Optional[float] = None  # None: 1.0 with a retain file, 0.0 without
    # The optimisation.
    lr: float = 1e-5
    # No decay by default: decay would shrink every weight, including the ones
    # the forget set never touches, which is change the user did not ask for.
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 5
    max_steps: Optional[int] = None
    batch_size: int = 4
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    gradient_checkpointing: bool = False
    # LoRA: the anchor is the same model with the adapter off, so no second copy.
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: Optional[str] = None  # comma-separated layer names; default: every linear layer in the blocks
    save_adapter: bool = False
    # Resumable state beside the output every N optimizer steps; --resume continues it.
    save_every: Optional[int] = None
    resume: bool = False

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
        if not self.forget:
            raise bad("forget", "is required: the JSONL or JSON file of records to unlearn")
        for name, choices in (("family", FAMILIES), ("kl", KL_DIRECTIONS), ("device", DEVICES), ("dtype", DTYPES),
                              ("method", METHODS)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise bad(name, f"must be one of {', '.join(choices)} (got {value!r})")
        for name in ("tau", "eta", "alpha", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "npo_beta"):
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
        if self.max_grad_norm <= 0:
            raise bad("max_grad_norm", f"must be > 0 (got {self.max_grad_norm})")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "lora_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, f"must be a whole number >= 1 (got {value!r})")
        if self.save_every is not None and (not isinstance(self.save_every, int) or self.save_every < 1):
            raise bad("save_every", f"must be a whole number >= 1 (got {self.save_every!r})")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise bad("max_steps", f"must be a whole number >= 1 (got {self.max_steps!r})")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise bad("lora_alpha", f"must be > 0 (got {self.lora_alpha!r})")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", f"must be in [0, 1) (got {self.lora_dropout!r})")
        if self.save_adapter and not self.lora:
            raise bad("save_adapter", "needs --lora")
        if self.alpha > 0 and not self.retain:
            raise bad("alpha", f"is {self.alpha} but no --retain file is given; add --retain FILE or drop --alpha")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def option_names() -> list[str]:
    return [f.name for f in fields(UnlearnConfig)]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Options from a YAML file, keys spelled as flags (`max-steps`) or as
    fields (`max_steps`). Unknown keys are errors: a typo must not silently
    fall back to a default."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read ({err})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(document).__name__}")

    known = set(option_names())
    options = {}
    for key, value in document.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown option {key!r}; the options are those of `mdu unlearn --help`")
        options[name] = value
    # Data and model paths in the file are relative to the file, which is what a
    # user who keeps run.yaml beside the data expects.
    for name in ("forget", "retain", "chat_template", "out"):
        value = options.get(name)
        if isinstance(value, str) and not Path(value).is_absolute():
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
