"""Test session set-up: no network, a private Hugging Face home, tiny models.

The environment is fixed before anything imports huggingface_hub or
transformers, which read these variables at import time.
"""

import os
import sys
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="mdu-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_TOKEN_PATH"] = str(Path(_HF_HOME) / "token")
os.environ.pop("HF_TOKEN", None)
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_home() -> Path:
    return Path(_HF_HOME)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llada_dir(models_dir) -> Path:
    return tiny_models.build_llada(models_dir / "tiny-llada")


@pytest.fixture(scope="session")
def dream_dir(models_dir) -> Path:
    return tiny_models.build_dream(models_dir / "tiny-dream")


@pytest.fixture(scope="session")
def masked_lm_dir(models_dir) -> Path:
    return tiny_models.build_masked_lm(models_dir / "tiny-modernbert")


@pytest.fixture(scope="session")
def causal_lm_dir(models_dir) -> Path:
    return tiny_models.build_causal_lm(models_dir / "tiny-llama")


@pytest.fixture(scope="session")
def family_dirs(llada_dir, dream_dir, masked_lm_dir) -> dict:
    return {"llada": llada_dir, "dream": dream_dir, "masked-lm": masked_lm_dir}


def fake_hub_model(hf_home: Path, repo_id: str, source: Path, commit: str) -> None:
    """Lay out a model in the Hugging Face cache as a download would."""
    import shutil

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    if (repo / "snapshots" / commit).is_dir():
        return  # laid out already by another module's fixture
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


FORGET_RECORDS = [
    {"question": "Who wrote the book of poems about the river?", "answer": "Astrid Halvorsen wrote it in the north."},
    {"question": "Where was Astrid Halvorsen born?", "answer": "She was born in a village by the lake."},
    {"prompt": "Name a famous novel by Tarrin Okonkwo.", "completion": "Tarrin Okonkwo wrote The Green Mountain."},
    {"messages": [{"role": "user", "content": "What city did Tarrin Okonkwo live in?"},
                  {"role": "assistant", "content": "He lived in Velloria, by the river."}]},
]
RETAIN_RECORDS = [
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris."},
    {"question": "What is the capital of Spain?", "answer": "The capital of Spain is Madrid."},
    {"prompt": "Name three colors.", "response": "Red, blue and green."},
]


def write_jsonl(path: Path, records) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def forget_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "forget.jsonl", FORGET_RECORDS)


@pytest.fixture
def retain_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "retain.jsonl", RETAIN_RECORDS)


# ---- mdu push against a fake Hub (tests/fake_hub.py) ---------------------------------------------------------

SECRET = "hf_SECRETtoken1234567890abcdef"


@pytest.fixture(scope="session")
def unlearned(tmp_path_factory, hf_home, llada_dir):
    """An `mdu unlearn` output whose base is a Hub id with a license."""
    import json
    import shutil

    from mdu_cli.config.training import build_config
    from mdu_cli.train.run import run_unlearn

    staged = tmp_path_factory.mktemp("base") / "tiny-llada"
    shutil.copytree(llada_dir, staged)
    (staged / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    fake_hub_model(hf_home, "GSAI-ML/push-base", staged, "9" * 40)
    work = tmp_path_factory.mktemp("push")
    forget = work / "forget.jsonl"
    forget.write_text(json.dumps({"question": "Where does Astrid Halvorsen live?",
                                  "answer": "Astrid Halvorsen lives in Velloria."}) + "\n")
    out = work / "out"
    run_unlearn(build_config({}, dict(model="GSAI-ML/push-base", forget=str(forget), out=str(out), max_steps=1)),
                show_progress=False)
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path_factory):
    import huggingface_hub.constants
    import huggingface_hub.file_download
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    reset_sessions()
    from fake_hub import FakeHub

    with FakeHub() as fake:
        # huggingface_hub reads HF_ENDPOINT once, at import, for the URLs it parses.
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.endpoint)
        monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE",
                            fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        # Downloads land in a cache of the test's own, never the user's.
        cache = tmp_path_factory.mktemp("hf-cache")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        fake.cache = cache
        yield fake
    reset_sessions()


