"""Writing the unlearned checkpoint so that it loads exactly like the base.

The files are written into a staging directory (see `output_location`), which
is renamed into place only when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Files copied verbatim from the base besides the weights and config: what
# `from_pretrained` needs to load the tokenizer and the model's own code. An
# allow-list, so nothing else the base directory may hold travels with it.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def write_model(model, source_dir: Path, staging: Path, max_shard_bytes: int, state_dict=None) -> None:
    """Weights (safetensors, sharded with an index above `max_shard_bytes`), config,
    tokenizer and generation files, and the base's remote-code `.py` files."""
    model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_bytes, state_dict=state_dict)
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
    # save_embedding_layers=False: mdu never adapts the embeddings, and peft's
    # "auto" would fetch the base's config from the Hub (no timeout) to check.
    peft_model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
    (staging / "README.md").unlink(missing_ok=True)  # PEFT's template card; mdu writes its own
    for name in TOKENIZER_FILES:
        if (source.path / name).is_file():
            shutil.copy2(source.path / name, staging / name)
