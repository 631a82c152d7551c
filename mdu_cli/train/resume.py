"""Resumable training state: what `--save-every N` writes and `--resume` reads.

A state directory sits beside the output (`OUT.mdu-state`) and holds the
trainable weights (all of them, or only the adapter with --lora) as
safetensors, the optimizer and scheduler states, every random generator, the
step reached and the log so far. It is written to a temporary sibling and
renamed into place, so a kill at any moment leaves either the previous state
or the new one, never half of one. Tensors are read back with
`torch.load(weights_only=True)`, which unpickles no code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from mdu_cli.errors import MduError
from mdu_cli.io.output_location import STATE_SUFFIX, publish

# Options that may differ between the interrupted command and the resuming one.
# Options that do not change the weights a run produces: a run may be resumed
# with them changed (watching it differently, saving more often).
NOT_IN_FINGERPRINT = ("resume", "save_every", "overwrite", "config_file", "report_to", "logging_dir", "eval_every",
                      "eval_records", "anchor_offload")


def state_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}{STATE_SUFFIX}"


# Blocks read from each local weight file for its digest: spread over the
# whole file, so two fine-tunes of one architecture (same header, same size)
# differ in it, at a few MB of reading for an 8B model instead of 16 GB.
SAMPLED_BLOCKS, BLOCK_BYTES = 256, 4096


def weights_identity(source) -> str:
    """What pins the base weights a state was trained from: the resolved
    commit of a Hub model; for a local one, a digest of each safetensors
    file's name, size, header and blocks sampled across it."""
    if source.is_hub and source.revision:
        return f"hub:{source.name}@{source.revision}"
    digest = hashlib.sha256()
    for path in sorted(Path(source.path).glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as handle:
            for k in range(SAMPLED_BLOCKS):
                handle.seek(k * max(0, size - BLOCK_BYTES) // max(1, SAMPLED_BLOCKS - 1))
                digest.update(handle.read(BLOCK_BYTES))
    return f"local:{digest.hexdigest()}"


def fingerprint(config: dict, data: dict) -> str:
    """What must be identical for a state to be continued: the options and the data."""
    relevant = {k: v for k, v in config.items() if k not in NOT_IN_FINGERPRINT}
    text = json.dumps({"config": relevant, "data": data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class TrainingState:
    step: int
    history: list[dict]
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    generators: dict[str, list[torch.Tensor]]  # one state per process
    torch_rng: list[torch.Tensor]
    # FSDP saves the optimizer keyed by parameter name (torch's full state
    # dict), DDP and single runs keyed by position: the two do not mix.
    sharded: bool = False


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_state(directory: Path, state: TrainingState, key: str) -> None:
    """Write the state atomically: build a sibling, then swap it in."""
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file(state.trainable, tmp / "trainable.safetensors")
        torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "generators": state.generators,
                    "torch_rng": state.torch_rng, "sharded": state.sharded}, tmp / "training.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": state.step, "fingerprint": key,
                                                       "history": state.history}) + "\n")
        publish(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _optimizer_state_classes() -> list:
    """Tensor subclasses an optimizer keeps its state in, which torch.load
    with weights_only must be told it may rebuild: torchao's 8-bit moments
    (--optimizer adamw-8bit). Only classes, never code from the file."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return []
    try:
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError:  # another torchao layout: its states then fail as damaged, by name
        return []
    return [OptimState8bit]


def read_training_file(path: Path) -> dict:
    """training.pt, read without running code from it (weights_only), its
    optimizer state classes allowed."""
    with torch.serialization.safe_globals(_optimizer_state_classes()):
        return torch.load(path, weights_only=True)


def load_state(directory: Path, key: str) -> Optional[TrainingState]:
    if not (directory / "progress.json").is_file():
        return None

    def damaged(name: str, what: str) -> MduError:
        return MduError(f"{directory / name}: the saved state is damaged ({what}); run the command without --resume "
                        f"and with --overwrite to start over (this deletes {directory})")

    try:
        progress = json.loads((directory / "progress.json").read_text(encoding="utf-8"))
        step, fingerprint_, history = progress["step"], progress["fingerprint"], progress["history"]
        if not isinstance(step, int) or step < 0 or not isinstance(history, list):
            raise TypeError
    except OSError as err:
        raise damaged("progress.json", f"cannot read: {err.strerror}") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise damaged("progress.json", "not the JSON mdu writes") from None
    if fingerprint_ != key:
        raise MduError(f"{directory} was saved by a run with other options, data or base weights; re-run that "
                       "exact command on the same files with --resume, or delete the state directory to start over")
    try:
        blob = read_training_file(directory / "training.pt")
        parts = (blob["optimizer"], blob["scheduler"], blob["generators"], blob["torch_rng"])
    except FileNotFoundError:
        raise damaged("training.pt", "missing") from None
    except Exception as err:  # torch.load raises many types on a cut or altered file
        raise damaged("training.pt", f"{type(err).__name__}") from None
    try:
        trainable = load_file(directory / "trainable.safetensors")
    except FileNotFoundError:
        raise damaged("trainable.safetensors", "missing") from None
    except Exception as err:  # safetensors raises its own error type on a bad header
        raise damaged("trainable.safetensors", f"{type(err).__name__}") from None
    optimizer, scheduler, generators, torch_rng = parts
    return TrainingState(step=step, history=history, trainable=trainable, optimizer=optimizer,
                         scheduler=scheduler, generators=generators, torch_rng=torch_rng,
                         sharded=bool(blob.get("sharded", False)))
