"""Finding a checkpoint, deciding whether its code may run, and loading it.

A model is a local directory or a Hub id. Hub checkpoints are fetched in two
steps so that every cheap check (remote-code policy, family, mask token,
tokenisation of the data) fails before gigabytes of weights are downloaded:
first the small files, then the safetensors. Pickled weights are never loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mdu_cli.errors import ConfigError, MduError
from mdu_cli.io.hub_session import looks_like_path, snapshot

log = logging.getLogger("mdu")

# Publishers of the masked diffusion LMs mdu targets. Their remote code is what
# every user of these models runs; anything else must be trusted explicitly.
TRUSTED_PUBLISHERS = ("GSAI-ML", "Dream-org", "inclusionAI")
# README.md only for its license line, which the unlearned model's card repeats.
SMALL_FILE_PATTERNS = ["*.json", "*.py", "*.txt", "*.model", "*.jinja", "*.tiktoken", "README.md"]
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


@dataclass(frozen=True)
class ModelSource:
    name: str                 # as the user gave it
    path: Path                # local directory holding the files
    is_hub: bool
    revision: Optional[str]   # resolved commit sha for a Hub model, None for a local one
    config: dict              # config.json, parsed as plain JSON (no code runs)

    @property
    def needs_remote_code(self) -> bool:
        from transformers import CONFIG_MAPPING

        model_type = self.config.get("model_type")
        return bool(self.config.get("auto_map")) and model_type not in CONFIG_MAPPING


def _read_config(directory: Path, name: str) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MduError(f"{name}: no config.json; point --model at a transformers checkpoint directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MduError(f"{config_path}: cannot read ({err.strerror}); check the file's permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise MduError(f"{config_path}: not valid JSON; the checkpoint is damaged, save or download it again") from None
    if not isinstance(config, dict):
        raise MduError(f"{config_path}: expected a JSON object; the checkpoint is damaged")
    return config


def resolve_source(name: str, revision: Optional[str] = None) -> ModelSource:
    """Locate the checkpoint and read its config, fetching only small files."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise MduError(f"{name}: is a file; --model takes a checkpoint directory or a Hub model id")
        if revision:
            raise ConfigError(f"--revision applies to Hub models; {name} is a local directory")
        return ModelSource(name, local.resolve(), False, None, _read_config(local, name))
    if looks_like_path(name):
        raise MduError(f"{name}: no such directory; check --model")
    directory = snapshot(name, revision, SMALL_FILE_PATTERNS)
    # The snapshot folder is named after the commit it holds, which is what
    # `--revision main` resolved to at this moment.
    return ModelSource(name, directory, True, directory.name, _read_config(directory, name))


def fetch_weights(source: ModelSource) -> None:
    """Download the safetensors of a Hub model at the already-resolved commit."""
    if source.is_hub:
        snapshot(source.name, source.revision, WEIGHT_PATTERNS)
    if not any(source.path.glob("*.safetensors")):
        raise MduError(
            f"{source.name}: no .safetensors weights (mdu never loads pickled .bin files); "
            "convert the checkpoint to safetensors first"
        )


def decide_remote_code(source: ModelSource, trust_remote_code: bool) -> bool:
    """Whether the checkpoint's own Python may run (a security decision)."""
    if not source.needs_remote_code:
        return False
    if not source.is_hub:
        return True  # a local directory holds the user's own files
    publisher = source.name.split("/")[0]
    if publisher in TRUSTED_PUBLISHERS:
        log.info(
            "Notice: running the remote code of %s (revision %s), a known masked-diffusion publisher",
            source.name, source.revision,
        )
        return True
    if trust_remote_code:
        log.info("Notice: running the remote code of %s (revision %s), as --trust-remote-code allows",
                 source.name, source.revision)
        return True
    raise MduError(
        f"{source.name} runs its own Python code (auto_map in config.json) and {publisher} is not a known "
        "MDLM publisher; read the code on the Hub, then pass --trust-remote-code (and --revision to pin it)"
    )


def resolve_device(device: str) -> str:
    """'auto' becomes cuda when a GPU is visible, else cpu; cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MduError("--device cuda, but no CUDA device is visible; use --device cpu or check the driver")
    return device


# Any one of these makes a directory hold a tokenizer that AutoTokenizer can load.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                     "spiece.model", "sentencepiece.bpe.model")


def read_chat_template(chat_template: str) -> str:
    """The text of a --chat-template file, or an error naming it."""
    path = Path(chat_template)
    if not path.is_file():
        raise MduError(f"--chat-template {path}: no such file" if not path.exists()
                       else f"--chat-template {path}: not a regular file; give a Jinja template file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise MduError(f"--chat-template {path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise MduError(f"--chat-template {path}: not UTF-8 text; save it as UTF-8") from None
    if not text.strip():
        raise MduError(f"--chat-template {path}: the file is empty; write a Jinja chat template")
    return text


def load_tokenizer(source: ModelSource, trust: bool, chat_template: Optional[str]):
    from transformers import AutoTokenizer

    template = read_chat_template(chat_template) if chat_template else None
    if not any((source.path / name).is_file() for name in TOKENIZER_MARKERS):
        raise MduError(f"{source.name}: no tokenizer in {source.path} (none of tokenizer.json, tokenizer_config.json, "
                       "vocab files); copy the base model's tokenizer files into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust)
    except Exception as err:
        raise MduError(f"{source.name}: cannot load the tokenizer from {source.path} ({type(err).__name__}); "
                       "check its tokenizer files, or copy them again from the base model") from None
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


# Where configs state how many positions the model takes (LLaDA:
# max_sequence_length; Dream, ModernBERT, Llama: max_position_embeddings).
POSITION_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length")


def max_positions(config: dict) -> Optional[int]:
    """The longest sequence the model takes, from its config; None when it does not say."""
    values = [config.get(key) for key in POSITION_KEYS]
    values = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(values) if values else None


def load_model(source: ModelSource, trust: bool, torch_dtype):
    """Load the trainable model. Remote-code families come through the class
    their `auto_map` names; native ones through AutoModelForMaskedLM."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if source.needs_remote_code:
        auto_map = source.config["auto_map"]
        loader = next(
            (cls for key, cls in (("AutoModel", AutoModel), ("AutoModelForMaskedLM", AutoModelForMaskedLM),
                                  ("AutoModelForCausalLM", AutoModelForCausalLM)) if key in auto_map),
            AutoModel,
        )
    else:
        loader = AutoModelForMaskedLM
    try:
        return loader.from_pretrained(source.path, dtype=torch_dtype, trust_remote_code=trust, use_safetensors=True)
    except Exception as err:
        raise MduError(f"{source.name}: cannot load the model ({type(err).__name__}: {err})") from None
