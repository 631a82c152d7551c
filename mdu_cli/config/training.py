"""The typed configurations of a training run: what `mdu unlearn` and
`mdu finetune` share (`TrainingConfig`), and each command's own
(`UnlearnConfig`: the forget and retain records and the method;
`FinetuneConfig`: the records to train on).

Filled from three layers, later ones winning: the defaults below, a YAML file
(`--config run.yaml`, read by `yaml_file.py`), and the flags the user typed.
Validated once, here, and written into `mdu_run.json` so that a run can be
repeated. Each field declares its own option (help, choices) in its metadata
(`fields.py`); the commands build their Click options from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional

from mdu_cli.config.choices import (
    BATCH_ACCOUNTINGS,
    DEVICES,
    DTYPES,
    FAMILIES,
    KL_DIRECTIONS,
    OPTIMIZERS,
    UNLEARN_METHODS,
)
from mdu_cli.config.fields import option
from mdu_cli.config.hub_names import check_revision
from mdu_cli.config.trackers import parse_trackers
from mdu_cli.errors import ConfigError
from mdu_cli.methods import METHODS, finetune

MAX_STEPS = 10_000_000
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _bad(option_name: str, problem: str) -> ConfigError:
    return ConfigError(f"--{option_name.replace('_', '-')} {problem}")


@dataclass(frozen=True)
class TrainingConfig:
    """The options every training run has: what to load, how to optimise,
    how to watch and resume it."""

    # What to train, and where the result goes.
    model: Optional[str] = option(path=True, help="Base checkpoint: a local directory or a Hub model id.")
    out: Optional[str] = option(path=True, help="Output directory.")
    overwrite: bool = option(False, help="Replace --out when it holds a previous mdu output (its run record and "
                             "nothing mdu did not write); any other non-empty folder is refused.")
    # How to load it.
    family: Optional[str] = option(choices=FAMILIES, help="Override the detected family.")
    revision: Optional[str] = option(help="Hub branch, tag or commit to pin; the resolved commit is recorded.")
    trust_remote_code: bool = option(False, help="Run the Python code of a Hub repo outside GSAI-ML/, Dream-org/, "
                                     "inclusionAI/.")
    chat_template: Optional[str] = option(file=True, help="Jinja chat template replacing the tokenizer's.")
    max_length: int = option(512, help="Tokens per record; longer responses are cut.")
    # The optimisation. optimizer "auto": torch's AdamW for fp32 weights, a
    # precision-safe AdamW for bf16 ones (mdu_cli/train/optimizers.py).
    optimizer: str = option("auto", choices=OPTIMIZERS, help="auto: torch's AdamW for fp32 weights, "
                            "Kahan-compensated AdamW (torch-optimi) for bf16 ones, whose plain updates round away. "
                            "adamw-sr (stochastic rounding) and adamw-8bit (8-bit states) need mdu-cli[torchao].")
    lr: float = option(1e-5, help="AdamW learning rate.")
    # No decay by default: decay would shrink every weight, including the ones
    # the forget set never touches, which is change the user did not ask for.
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    warmup_ratio: float = option(0.1, help="Linear warmup share, then cosine decay.")
    epochs: int = option(5, help="Passes over the data.")
    max_steps: Optional[int] = option(help="Optimizer steps; replaces --epochs.")
    batch_size: int = option(4, help="Records per micro-batch (forget and retain alike).")
    grad_accum: int = option(4, help="Micro-batches per optimizer step.")
    max_grad_norm: float = option(1.0, help="Clip the gradient to this global norm; 0: no clipping.")
    # Step each parameter inside backward and free its gradient at once
    # (mdu_cli/train/optimizers.py): no full set of gradients, at the price of
    # one backward per step and no global-norm clipping.
    optimizer_in_backward: bool = option(False, help="Step each parameter inside backward and free its gradient "
                                         "at once: no full set of gradients in memory (2 bytes a parameter on "
                                         "bf16). Needs --grad-accum 1 and --max-grad-norm 0, one process.")
    # Fewer kernel launches (docs/scale.md): one forward and one backward over
    # a micro-batch's forget and retain rows, and torch.compile of the blocks.
    # Both change the numbers at rounding level only, so both are opt-in.
    stack_forward: bool = option(False, help="One forward and one backward over a micro-batch's forget and retain "
                                 "rows together (fewer kernel launches; both rows' activations at once). Always so "
                                 "with --optimizer-in-backward.")
    compile_blocks: bool = option(False, help="torch.compile every transformer block of the trained model (the "
                                  "first steps pay for compiling; needs a C++ compiler on the CPU).")
    seed: int = option(42, help="Seed for data order and masks.")
    device: str = option("auto", choices=DEVICES)
    dtype: str = option("auto", choices=DTYPES, help="auto: bf16 weights on CUDA, fp32 on CPU. fp16: fp32 weights "
                        "with fp16 autocast (CUDA).")
    gradient_checkpointing: bool = option(False, help="Recompute block activations in backward: less memory, about "
                                          "a third more time.")
    # LoRA: for unlearning, the anchor is the same model with the adapter off, so no second copy.
    lora: bool = option(False, help="Train a LoRA adapter (for unlearning, the anchor is the model with the "
                        "adapter off).")
    lora_r: int = option(16, help="LoRA rank.")
    lora_alpha: float = option(32.0, help="LoRA alpha (scale alpha/r).")
    lora_dropout: float = option(0.0)
    lora_targets: Optional[str] = option(help="Comma-separated linear layer names inside the blocks.  "
                                         "[default: all of them; never the head]")
    save_adapter: bool = option(False, help="With --lora: write the adapter alone (PEFT layout), not merged "
                                "weights.")
    # Watching the run: trackers (comma-separated names), where their files go,
    # and the periodic probe of answer probability on a few records.
    report_to: Optional[str] = option(help="Experiment trackers, comma-separated: tensorboard, wandb, trackio "
                                      "(install the extra of the same name). They get the numbers of "
                                      "train_log.jsonl.")
    logging_dir: Optional[str] = option(path=True, help="Where trackers write.  [default: <out>-logs]")
    eval_every: Optional[int] = option(help="Every N steps (and before the first), log the answer probability of "
                                       "the first --eval-records forget and retain records.")
    eval_records: int = option(16, help="Records per split that --eval-every probes.")
    # Resumable state beside the output every N optimizer steps; --resume continues it.
    save_every: Optional[int] = option(help="Save resumable state beside the output every N steps.")
    resume: bool = option(False, help="Continue from the saved state of the same command.")
    max_shard_size: str = option("5GB", help="Largest safetensors shard.")
    # The YAML file the options came from (set by the command, never by the
    # file): an input that --overwrite must not delete.
    config_file: Optional[str] = option(path=True, cli=False)

    # What each kind of run says about itself; see the subclasses.
    command: ClassVar[str] = "train"

    # --- what the loop and the output ask of a run ---------------------------

    @property
    def records(self) -> Optional[str]:
        """The records the objective is computed on."""
        raise NotImplementedError

    @property
    def retain_records(self) -> Optional[str]:
        return None

    @property
    def retain_weight(self) -> float:
        """alpha: the weight of the retain loss (0: no retain term)."""
        return 0.0

    @property
    def joint_accounting(self) -> bool:
        """Whether forget and retain rows share one plan of steps."""
        return False

    @property
    def described(self):
        """The registry entry that describes the run (cards, names, the loss)."""
        raise NotImplementedError

    def objective(self):
        """The loss object the loop minimises on `records`."""
        return self.described.build(self)

    # --- resolving and validating --------------------------------------------

    def resolved(self):
        """Fill the values that depend on others, then validate."""
        self.validate()
        return self

    def validate(self) -> None:
        if not self.model:
            raise _bad("model", "is required: a local checkpoint directory or a Hub model id")
        check_revision(self.revision, "--revision")
        self._check_records()
        for item in fields(self):
            value, choices = getattr(self, item.name), item.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise _bad(item.name, f"must be one of {', '.join(choices)} (got {value!r})")
        for name in float_fields(type(self)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise _bad(name, f"must be a finite number (got {value!r})")
        self._check_objective()
        if self.lr <= 0:
            raise _bad("lr", f"must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            raise _bad("weight_decay", f"must be >= 0 (got {self.weight_decay})")
        if not 0 <= self.warmup_ratio < 1:
            raise _bad("warmup_ratio", f"must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm < 0:
            raise _bad("max_grad_norm", f"must be >= 0, where 0 turns clipping off (got {self.max_grad_norm})")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "lora_r", "eval_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(name, f"must be a whole number >= 1 (got {value!r})")
        for name in ("save_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise _bad(name, f"must be a whole number >= 1 (got {value!r})")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise _bad("max_steps", f"must be a whole number >= 1 (got {self.max_steps!r})")
        # The plan of steps is built up front: a run of billions of steps would
        # fill the memory before the first one.
        if self.max_steps is not None and self.max_steps > MAX_STEPS:
            raise _bad("max_steps", f"must be at most {MAX_STEPS:,} (got {self.max_steps:,})")
        if self.epochs > MAX_STEPS:
            raise _bad("epochs", f"must be at most {MAX_STEPS:,} (got {self.epochs:,})")
        # Each process seeds generators at seed + a few + 1000 x rank; torch takes 64 bits.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**62:
            raise _bad("seed", f"must be a whole number from 0 to 2**62 (got {self.seed!r})")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise _bad("lora_alpha", f"must be > 0 (got {self.lora_alpha!r})")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise _bad("lora_dropout", f"must be in [0, 1) (got {self.lora_dropout!r})")
        self._check_anchor()
        if self.optimizer_in_backward:
            self._check_in_backward()
        if self.save_adapter and not self.lora:
            raise _bad("save_adapter", "needs --lora")
        self.shard_size_bytes  # raises on a size save_pretrained would refuse after training
        parse_trackers(self.report_to)  # a tracker that is not installed fails now, not after loading
        self._check_mix()

    def _check_records(self) -> None:
        """The record files the run needs."""

    def _check_objective(self) -> None:
        """The objective's own knobs."""

    def _check_anchor(self) -> None:
        """Options about the frozen anchor."""

    def _check_mix(self) -> None:
        """How forget and retain rows combine."""

    def _check_in_backward(self) -> None:
        """--optimizer-in-backward steps every parameter during the one
        backward of a step: the options that need a whole step's gradient at
        once cannot apply, and are refused rather than quietly changed."""
        why = "with --optimizer-in-backward each parameter steps as soon as its gradient is ready"
        if self.grad_accum != 1:
            raise _bad("grad_accum", f"must be 1 {why}, so nothing can accumulate over micro-batches; "
                       f"raise --batch-size instead (--batch-size {self.batch_size * self.grad_accum} "
                       "--grad-accum 1 keeps the rows a step)")
        if self.max_grad_norm != 0:
            raise _bad("max_grad_norm", f"must be 0 {why}, before the global norm is known; pass --max-grad-norm 0 "
                       "(the norm is still logged)")
        if self.optimizer not in ("auto", "adamw-kahan"):
            raise _bad("optimizer", f"{self.optimizer} cannot step inside backward; use adamw-kahan (or auto)")
        if self.dtype == "fp16":
            raise _bad("dtype", "fp16 scales the loss and unscales whole gradients before the step, which "
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


@dataclass(frozen=True)
class UnlearnConfig(TrainingConfig):
    """`mdu unlearn`: the records to forget (and keep), and the method."""

    # Each command names its default output after what it does.
    out: Optional[str] = option(path=True, help="Output directory.  [default: <model name>-mdu-tau<tau>, -ga or "
                                "-npo-beta<beta>]")
    forget: Optional[str] = option(path=True, help="Records to unlearn: JSONL or a JSON array, or "
                                   "hf://datasets/OWNER/NAME/PATH.  [required]")
    retain: Optional[str] = option(path=True, help="Records whose behaviour to keep (optional; a file or "
                                   "hf://datasets/...).")
    # The objective (docs/method.md section 2), or a baseline.
    method: str = option("mdu", choices=UNLEARN_METHODS,
                         help="mdu, or a baseline: " + ", ".join(m.summary for m in METHODS.values()
                                                                 if m.name != "mdu") + ".")
    npo_beta: float = option(0.1, help="Beta of the npo baseline (on per-token scores).")
    tau: float = option(1.0, help="Anchor temperature (>= 0; 0 = uniform target).")
    eta: float = option(0.0, help="Extrapolation of the target away from the conditional.")
    kl: str = option("forward", choices=KL_DIRECTIONS, help="Divergence direction.")
    alpha: Optional[float] = option(help="Retain-loss weight.  [default: 1.0 with --retain, else 0]")
    batch_accounting: str = option(
        "separate", choices=BATCH_ACCOUNTINGS,
        help="separate: each micro-batch has --batch-size forget rows plus as many retain rows, an epoch is a pass "
        "over the forget set. joint: the reference code's way, forget and retain shuffled into one set, an epoch a "
        "pass over both (twice the steps for equal sizes).")
    # Keep the frozen anchor of full MDU/NPO in host memory, streamed to the
    # device (model/streamed_anchor.py): the weights' size less on the GPU.
    anchor_offload: bool = option(False, help="Full MDU/NPO: keep the frozen anchor in pinned host memory and "
                                  "stream it to the GPU block by block, one pass a step, a step ahead (the weights' "
                                  "size less GPU memory).")

    command: ClassVar[str] = "unlearn"

    @property
    def records(self) -> Optional[str]:
        return self.forget

    @property
    def retain_records(self) -> Optional[str]:
        return self.retain

    @property
    def retain_weight(self) -> float:
        return self.alpha if self.retain else 0.0

    @property
    def joint_accounting(self) -> bool:
        return self.batch_accounting == "joint"

    @property
    def described(self):
        return METHODS[self.method]

    def resolved(self) -> "UnlearnConfig":
        alpha = self.alpha
        if alpha is None:
            alpha = 1.0 if self.retain else 0.0
        cfg = dataclasses.replace(self, alpha=alpha)
        cfg.validate()
        return cfg

    def _check_records(self) -> None:
        if not self.forget:
            raise _bad("forget", "is required: the JSONL or JSON file of records to unlearn")
        if self.method == finetune.METHOD.name:
            raise _bad("method", f"must be one of {', '.join(UNLEARN_METHODS)} (got {self.method!r}); "
                       "plain fine-tuning is `mdu finetune`")

    def _check_objective(self) -> None:
        if self.tau < 0:
            raise _bad("tau", f"must be >= 0 (got {self.tau}); tau = 0 pulls toward the uniform distribution")
        if self.npo_beta <= 0:
            raise _bad("npo_beta", f"must be > 0 (got {self.npo_beta})")
        if self.alpha < 0:
            raise _bad("alpha", f"must be >= 0 (got {self.alpha})")

    def _check_anchor(self) -> None:
        if self.anchor_offload and (self.lora or not METHODS[self.method].build(self).needs_anchor):
            raise _bad("anchor_offload", "applies to full MDU and NPO, whose anchor is a frozen copy of the weights "
                       "(with --lora the anchor is the model itself with the adapter off)")

    def _check_mix(self) -> None:
        if self.batch_accounting == "joint" and not (self.retain and self.alpha > 0):
            raise _bad("batch_accounting", "joint mixes forget and retain rows; it needs --retain (and --alpha > 0)")
        if self.alpha > 0 and not self.retain:
            raise _bad("alpha", f"is {self.alpha} but no --retain file is given; add --retain FILE or drop --alpha")


@dataclass(frozen=True)
class FinetuneConfig(TrainingConfig):
    """`mdu finetune`: plain MDLM fine-tuning on one set of records."""

    out: Optional[str] = option(path=True, help="Output directory.  [default: <model name>-finetuned]")
    data: Optional[str] = option(path=True, help="Records to train on: JSONL or a JSON array, or "
                                 "hf://datasets/OWNER/NAME/PATH.  [required]")

    command: ClassVar[str] = "finetune"

    @property
    def records(self) -> Optional[str]:
        return self.data

    @property
    def described(self):
        return finetune.METHOD

    def _check_records(self) -> None:
        if not self.data:
            raise ConfigError("--data is required: the JSONL or JSON file of records to train on")


CONFIGS = {cls.command: cls for cls in (UnlearnConfig, FinetuneConfig)}


@functools.cache
def _hints(cls) -> dict[str, Any]:
    # get_type_hints evaluates every (string) annotation of the class: once per
    # class, not once per field asked about (it is asked for each option when
    # the commands are built, and for each float on every validation).
    return typing.get_type_hints(cls)


def kind_of(cls, name: str) -> type:
    """The scalar type a field holds: bool, int, float or str."""
    hint = _hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def is_optional(cls, name: str) -> bool:
    return type(None) in typing.get_args(_hints(cls)[name])


def float_fields(cls) -> list[str]:
    return [item.name for item in fields(cls) if kind_of(cls, item.name) is float]


def build_config(file_options: dict[str, Any], flag_options: dict[str, Any], kind: type = UnlearnConfig):
    """Defaults < YAML file < flags, then resolve and validate; `kind` is the
    command's config class (UnlearnConfig or FinetuneConfig)."""
    merged = {**file_options, **flag_options}
    try:
        cfg = kind(**merged)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    for name in float_fields(kind):
        value = getattr(cfg, name)
        if isinstance(value, int) and not isinstance(value, bool):
            cfg = dataclasses.replace(cfg, **{name: float(value)})
    return cfg.resolved()
