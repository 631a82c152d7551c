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
the update (benchmarks/bf16_fidelity.py; docs/scale.md).

--optimizer-in-backward steps each parameter as soon as its gradient is
complete, inside backward, and frees that gradient at once (torch-optimi's
gradient release), so the full set of gradients never exists: 2 bytes a
parameter less on bf16 weights, what lets full MDU on an 8B model fit 80 GB.
The price is in its semantics: one backward per step (no accumulation over
micro-batches: forget and retain losses go into one backward), and no
clipping by the global norm, which is only known once every parameter has
already stepped.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Optional

import torch

from mdu_cli.config.choices import OPTIMIZERS
from mdu_cli.errors import ConfigError

DEFAULT_BF16 = "adamw-kahan"
IN_BACKWARD = "adamw-kahan"  # the one choice that can step a parameter alone, inside backward
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


def resolve(requested: str, weight_dtype: torch.dtype, in_backward: bool = False) -> str:
    """The optimizer a run uses: `auto` by the weights' dtype, anything else as
    asked. In backward only torch-optimi's AdamW can step one parameter at a
    time; on fp32 weights it has nothing to compensate and is plain AdamW."""
    if requested not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {requested!r})")
    if requested == "auto" and in_backward:
        return IN_BACKWARD  # any other choice with in_backward is refused by the config, and by build()
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


def build(name: str, params, lr: float, weight_decay: float, weight_dtype: torch.dtype,
          in_backward: bool = False) -> tuple[torch.optim.Optimizer, OptimizerChoice]:
    """The optimizer over `params`, and what to record about it. With
    `in_backward` it is built to step inside backward: attach it with
    `StepInBackward`."""
    params = list(params)
    if in_backward and name != IN_BACKWARD:
        raise ConfigError(f"--optimizer-in-backward needs --optimizer {IN_BACKWARD} (got {name})")
    optimizer, choice = _build(name, params, lr, weight_decay, weight_dtype, in_backward)
    # The record reads the hyperparameters back from the optimizer itself, so
    # it says what ran: a library default that slipped in (optimi's betas are
    # 0.9/0.99) shows in mdu_run.json instead of hiding behind the constants.
    # (torch-optimi keeps beta1 and beta2 apart; torchao keeps lr as a tensor,
    # so the record takes the lr asked for.)
    group = optimizer.param_groups[0]
    betas = group["betas"] if "betas" in group else (group["beta1"], group["beta2"])
    held = {"lr": lr, "betas": [float(b) for b in betas], "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"])}
    return optimizer, OptimizerChoice(choice.name, choice.library, {**held, **choice.settings})


def _build(name: str, params: list, lr: float, weight_decay: float, weight_dtype: torch.dtype,
           in_backward: bool) -> tuple[torch.optim.Optimizer, OptimizerChoice]:
    """The optimizer and its record's library and extra settings (`build`
    adds the hyperparameters, read back from the optimizer)."""
    if name == "adamw":
        return (torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay),
                OptimizerChoice(name, f"torch {torch.__version__}", {}))
    if name == "adamw-kahan":
        import optimi

        # decouple_lr=False: decay is lr x weight_decay, as in torch's AdamW.
        # Compensation only applies to low-precision weights (fp32 ones have
        # nothing to carry), and the record says which it was.
        # Triton kernels on a GPU (one fused kernel a tensor, fp32 inside);
        # named here because gradient release would otherwise take the eager
        # path where an ordinary step takes Triton's, and the two round apart.
        triton = bool(optimi.utils.HAS_TRITON and params and all(p.is_cuda for p in params))
        optimizer = optimi.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                                 decouple_lr=False, kahan_sum=True, foreach=False, triton=triton,
                                 gradient_release=in_backward)
        extra = {"kahan_sum": weight_dtype in (torch.bfloat16, torch.float16), "triton": triton}
        if in_backward:
            extra["in_backward"] = True
        return optimizer, OptimizerChoice(name, f"torch-optimi {_version('torch-optimi')}", extra)
    stochastic = weight_dtype == torch.bfloat16
    if name == "adamw-sr":
        from torchao.optim import _AdamW

        optimizer = _AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                           bf16_stochastic_round=stochastic)
        return optimizer, OptimizerChoice(name, f"torchao {_version('torchao')}",
                                          {"bf16_stochastic_round": stochastic})
    if name == "adamw-8bit":
        from torchao.optim import AdamW8bit

        optimizer = AdamW8bit(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                              bf16_stochastic_round=stochastic)
        return optimizer, OptimizerChoice(name, f"torchao {_version('torchao')}",
                                          {"bf16_stochastic_round": stochastic, "block_size": 256})
    raise ConfigError(f"--optimizer {name!r} is not known")


class StepInBackward:
    """The optimizer stepping each parameter inside backward, as soon as its
    gradient is complete, and freeing that gradient (torch-optimi's gradient
    release). A hook registered first measures each gradient's squared norm
    on its way through, so the run still logs the step's gradient norm.

    The learning rate is read from the parameter group when the hook runs, so
    the scheduler steps after backward, as with an ordinary step.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        import optimi

        self.model, self.optimizer = model, optimizer
        # The hooks read each parameter's learning rate from the group its
        # state points to; anything that reloaded the state (accelerate's
        # prepare() does, to place it) left copies there, which the
        # scheduler would never reach.
        _link_groups(optimizer)
        self._squares: Optional[torch.Tensor] = None
        self._handles = [p.register_post_accumulate_grad_hook(self._measure)
                         for p in model.parameters() if p.requires_grad]
        optimi.prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=True)

    def _measure(self, param: torch.Tensor) -> None:
        # The norm in the gradient's dtype, as clip_grad_norm_ takes it: an
        # fp32 copy of LLaDA's embedding gradient would add 2 GB at its step.
        square = torch.linalg.vector_norm(param.grad.detach()).float().pow(2)
        self._squares = square if self._squares is None else self._squares + square

    def grad_norm(self) -> float:
        """The norm of the gradient the last backward applied (and forget it)."""
        squares, self._squares = self._squares, None
        return 0.0 if squares is None else math.sqrt(squares.item())

    def remove(self) -> None:
        import optimi

        for handle in self._handles:
            handle.remove()
        optimi.remove_gradient_release(self.model)


def state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state to save. Gradient release keeps a reference to
    each parameter's group inside its state; saved, it would drag every
    parameter of the group into the file, so it is left out here and put back
    by `load_state_dict`."""
    saved = optimizer.state_dict()
    saved["state"] = {index: {k: v for k, v in state.items() if k != "group"}
                      for index, state in saved["state"].items()}
    return saved


def load_state_dict(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    optimizer.load_state_dict(saved)
    if getattr(optimizer, "defaults", {}).get("gradient_release"):
        _link_groups(optimizer)  # load_state_dict made new group dicts


def _link_groups(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param]["group"] = group


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
