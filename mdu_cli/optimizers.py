"""The optimizer of a run (`--optimizer`), chosen for the weights' precision.

bf16 weights updated in place lose small steps: at lr 1e-5 an Adam update on
a weight of magnitude 0.02 is about a sixth of half a bf16 ulp, so plain AdamW
rounds most of the unlearning away. The choices, all AdamW with the same
betas, eps and decoupled weight decay as torch's:

- adamw:        torch.optim.AdamW; states in the weights' dtype. Right for fp32
                weights; for bf16 it drops most small updates.
- adamw-kahan:  torch-optimi's AdamW with Kahan-compensated updates: a bf16
                buffer per weight keeps what the rounding lost and adds it back
                at the next step. 6 bytes a parameter of state for bf16 weights.
- adamw-sr:     torchao's AdamW with bf16 stochastic rounding: each update rounds
                up or down at random, in proportion, so the expected weight is the
                exact one. 4 bytes a parameter (extra: mdu-cli[torchao]).
- adamw-8bit:   torchao's AdamW8bit (block-wise 8-bit moments) with stochastic
                rounding for bf16 weights: about 2 bytes a parameter (extra:
                mdu-cli[torchao]).

`auto` (the default) takes adamw for fp32 weights and DEFAULT_BF16 for bf16
ones, the choice that measured best per byte of state among those that keep
the update (benchmarks/bf16_fidelity.py; README).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from mdu_cli.config import OPTIMIZERS
from mdu_cli.errors import ConfigError

DEFAULT_BF16 = "adamw-kahan"
BETAS, EPS = (0.9, 0.999), 1e-8
_NEEDS = {"adamw-kahan": ("optimi", "torch-optimi"), "adamw-sr": ("torchao", "torchao"),
          "adamw-8bit": ("torchao", "torchao")}


@dataclass(frozen=True)
class OptimizerChoice:
    name: str            # one of OPTIMIZERS but "auto"
    library: str         # where it comes from, for mdu_run.json
    settings: dict       # what it was built with, for mdu_run.json

    def record(self) -> dict:
        return {"name": self.name, "library": self.library, **self.settings}


def resolve(requested: str, weight_dtype: torch.dtype) -> str:
    """The optimizer a run uses: `auto` by the weights' dtype, anything else as asked."""
    if requested not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {requested!r})")
    if requested == "auto":
        return DEFAULT_BF16 if weight_dtype == torch.bfloat16 else "adamw"
    return requested


def check_available(name: str) -> None:
    """A usage error now, before any weight loads, when the library is missing."""
    if name in _NEEDS:
        module, package = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            extra = "torchao" if module == "torchao" else None
            how = f"pip install 'mdu-cli[{extra}]'" if extra else f"pip install {package}"
            raise ConfigError(f"--optimizer {name} needs the {package} package; {how}")


def build(name: str, params, lr: float, weight_decay: float,
          weight_dtype: torch.dtype) -> tuple[torch.optim.Optimizer, OptimizerChoice]:
    """The optimizer over `params`, and what to record about it."""
    params = list(params)
    settings = {"lr": lr, "betas": list(BETAS), "eps": EPS, "weight_decay": weight_decay}
    if name == "adamw":
        return (torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay),
                OptimizerChoice(name, f"torch {torch.__version__}", settings))
    if name == "adamw-kahan":
        import optimi

        # decouple_lr=False: decay is lr x weight_decay, as in torch's AdamW.
        optimizer = optimi.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                                 decouple_lr=False, kahan_sum=True, foreach=False)
        return optimizer, OptimizerChoice(name, f"torch-optimi {_version('torch-optimi')}",
                                          {**settings, "kahan_sum": True})
    stochastic = weight_dtype == torch.bfloat16
    if name == "adamw-sr":
        from torchao.optim import _AdamW

        optimizer = _AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                           bf16_stochastic_round=stochastic)
        return optimizer, OptimizerChoice(name, f"torchao {_version('torchao')}",
                                          {**settings, "bf16_stochastic_round": stochastic})
    if name == "adamw-8bit":
        from torchao.optim import AdamW8bit

        optimizer = AdamW8bit(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                              bf16_stochastic_round=stochastic)
        return optimizer, OptimizerChoice(name, f"torchao {_version('torchao')}",
                                          {**settings, "bf16_stochastic_round": stochastic, "block_size": 256})
    raise ConfigError(f"--optimizer {name!r} is not known")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state holds, tensor subclasses (8-bit states) by
    their inner tensors."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            total += _tensor_bytes(value)
    return total


def _tensor_bytes(value) -> int:
    if not torch.is_tensor(value):
        return 0
    if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor \
            and not isinstance(value, torch.nn.Parameter):
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, n)) for n in names)
    return value.numel() * value.element_size()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
