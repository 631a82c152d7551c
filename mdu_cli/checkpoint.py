"""Writing the unlearned checkpoint so that it loads exactly like the base.

The output is built in a hidden sibling directory and renamed into place only
when complete: an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

from mdu_cli.errors import MduError

# Files copied verbatim from the base besides the weights and config: what
# `from_pretrained` needs to load the tokenizer and the model's own code. An
# allow-list, so nothing else the base directory may hold travels with it.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def is_within(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def check_out_dir(out: Path, overwrite: bool, base_dir: Path | None = None, protected: Iterable[Path] = ()) -> None:
    """Refuse an --out that would lose or mix in anything."""
    if base_dir is not None and is_within(out, base_dir):
        raise MduError(f"--out {out} is inside the base model directory {base_dir}; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise MduError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MduError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another directory")
        for path in ([base_dir] if base_dir else []) + list(protected):
            if is_within(path, out):
                raise MduError(f"--out {out} holds {path}, which --overwrite would delete; choose another directory")


def new_staging_dir(out: Path) -> Path:
    """A hidden sibling of `out`, on the same filesystem so the final rename is atomic."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def write_model(model, source_dir: Path, staging: Path, max_shard_size: str, state_dict=None) -> None:
    """Weights (safetensors, sharded with an index above `max_shard_size`), config,
    tokenizer and generation files, and the base's remote-code `.py` files."""
    try:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size, state_dict=state_dict)
    except ValueError as err:
        raise MduError(f"cannot write the weights ({err}); check --max-shard-size (e.g. 5GB)") from None
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, staging / name)  # follows Hub-cache symlinks
    for code in sorted(source_dir.glob("*.py")):
        shutil.copy2(code, staging / code.name)


def write_adapter(peft_model, source, staging: Path) -> None:
    """The LoRA adapter alone, in the PEFT layout (adapter_config.json,
    adapter_model.safetensors), naming the base by the id the user gave, plus
    the tokenizer files so the directory is self-contained."""
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = source.name
    if source.revision:
        config.revision = source.revision
    peft_model.save_pretrained(staging, safe_serialization=True)
    (staging / "README.md").unlink(missing_ok=True)  # PEFT's template card; mdu writes its own
    for name in TOKENIZER_FILES:
        if (source.path / name).is_file():
            shutil.copy2(source.path / name, staging / name)


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to `out`, replacing what is there.

    The old output is first renamed aside, so that at no moment does `out`
    hold a mixture of the two.
    """
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)
