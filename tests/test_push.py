"""`mdu push` through the real huggingface_hub client against a local fake Hub.

The fake Hub (tests/fake_hub.py) listens on 127.0.0.1 and records what the
client sends, so these tests check the HTTP boundary: which files were
committed, the card's YAML, the Authorization header. Nothing touches the
network.
"""

import json
import shutil
import socket

import pytest
import yaml
from click.testing import CliRunner
from conftest import SECRET

from mdu_cli.cli import cli
from mdu_cli.config.training import build_config
from mdu_cli.hub.card import GENERATED_MARKER
from mdu_cli.train.run import run_unlearn

MODEL_FILES = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "configuration_tiny_llada.py",
               "modeling_tiny_llada.py", "README.md", "mdu_run.json", "delta_report.json", "delta_report.md"}


@pytest.fixture
def out_dir(unlearned, tmp_path):
    """A fresh copy, with things that must never be uploaded beside the model."""
    directory = tmp_path / "out"
    shutil.copytree(unlearned, directory)
    (directory / "forget.jsonl").write_text('{"question": "private", "answer": "Astrid Halvorsen"}\n')
    (directory / "notes.csv").write_text("name,secret\n")
    (directory / "records.json").write_text("[]")
    (directory / ".env").write_text("HF_TOKEN=x\n")
    (directory / "cache").mkdir()
    (directory / "cache" / "model.safetensors").write_bytes(b"not really")
    return directory


def run(*args):
    return CliRunner().invoke(cli, ["push", *[str(a) for a in args]])


def _card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_sends_only_the_model_and_its_paperwork(hub, out_dir):
    result = run(out_dir, "--repo-id", "me/forgot", "--private")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"Uploaded {len(MODEL_FILES)} files to {hub.endpoint}/me/forgot"
    assert len(hub.created) == 1
    assert (hub.created[0]["organization"], hub.created[0]["name"], hub.created[0]["private"]) == ("me", "forgot", True)
    files = hub.committed_files()
    assert set(files) == MODEL_FILES
    assert files["model.safetensors"] == (out_dir / "model.safetensors").read_bytes()
    everything = b"".join(files.values())
    assert b"Halvorsen" not in everything and b"Velloria" not in everything

    card = files["README.md"].decode()
    meta = _card_meta(card)
    assert meta["base_model"] == "GSAI-ML/push-base" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["license"] == "mit"
    assert set(meta["tags"]) == {"mdu", "machine-unlearning", "masked-diffusion", "llada"}
    run_record = json.loads((out_dir / "mdu_run.json").read_text())
    assert run_record["data"]["forget"]["sha256"] in card
    assert 'AutoModel.from_pretrained("me/forgot", trust_remote_code=True' in card
    assert "How the weights moved" in card and "does not guarantee" in card

    auth = {r["headers"].get("authorization") for r in hub.requests}
    assert auth == {f"Bearer {SECRET}"}
    assert SECRET not in result.stdout + result.stderr
    assert SECRET not in "".join(p.read_text(errors="ignore") for p in out_dir.rglob("*") if p.is_file())


def test_create_pr_and_revision(hub, out_dir):
    result = run(out_dir, "--repo-id", "me/forgot", "--create-pr", "--commit-message", "Forget v2", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["pr_url"] == f"{hub.endpoint}/me/forgot/discussions/1"
    assert hub.commits[-1]["create_pr"] and hub.commits[-1]["header"]["summary"] == "Forget v2"

    result = run(out_dir, "--repo-id", "me/forgot", "--revision", "unlearned")
    assert result.exit_code == 0, result.stderr
    assert any(r["path"].startswith("/api/models/me/forgot/branch/unlearned") for r in hub.requests)
    assert hub.commits[-1]["revision"] == "unlearned"


def test_dry_run_plans_without_network(hub, out_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dry run needs no network at all
    result = run(out_dir, "--repo-id", "me/forgot", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert {e["path"] for e in plan["upload"]} == MODEL_FILES
    reasons = {e["path"]: e["reason"] for e in plan["skip"]}
    assert reasons["forget.jsonl"] == reasons["records.json"] == reasons["notes.csv"] == \
        "may hold data or pickles: never uploaded"
    assert reasons[".env"] == "hidden file"
    assert reasons["cache/model.safetensors"].startswith("inside a subdirectory")
    assert reasons["train_log.jsonl"] == "training log: stays local"
    assert all(e["size"] > 0 for e in plan["upload"])
    assert hub.requests == []

    text = run(out_dir, "--repo-id", "me/forgot", "--dry-run")
    assert text.exit_code == 0
    assert "Would upload to me/forgot:" in text.stdout and "forget.jsonl  (may hold data" in text.stdout
    assert hub.requests == []


def test_offline_mode_is_an_error_before_any_work(hub, out_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = (out_dir / "README.md").read_text()
    result = run(out_dir, "--repo-id", "me/forgot")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("Error: HF_HUB_OFFLINE is set, and mdu push needs the network; "
                                     "unset it (or use --dry-run)")
    assert hub.requests == [] and (out_dir / "README.md").read_text() == before


@pytest.mark.parametrize("status, message", [
    (401, "rejected the token (401)"),
    (403, "may not write to me/forgot (403)"),
    (404, "me is not a namespace you can create repositories in (404)"),
    (429, "rate-limiting this account (429); wait a few minutes and run the same command again: it resumes"),
])
def test_hub_errors_become_one_line(hub, out_dir, status, message):
    hub.fail_with = status
    result = run(out_dir, "--repo-id", "me/forgot")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout


def test_network_failure(hub, out_dir, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    result = run(out_dir, "--repo-id", "me/forgot")
    assert result.exit_code == 1
    assert "could not reach the Hub" in result.stderr and "it resumes" in result.stderr


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "mdu_run.json").unlink(), "no mdu_run.json"),
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "weights unreadable"),
    (lambda d: (d / "mdu_run.json").write_text('{"tool": "other"}'), "not written by mdu unlearn"),
])
def test_incomplete_directory_is_refused_before_network(hub, out_dir, damage, problem):
    damage(out_dir)
    result = run(out_dir, "--repo-id", "me/forgot")
    assert result.exit_code == 1 and "is not a complete `mdu unlearn` output" in result.stderr
    assert problem in result.stderr
    assert hub.requests == []


def test_user_card_is_kept_unless_regenerated(hub, out_dir):
    (out_dir / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    assert run(out_dir, "--repo-id", "me/forgot").exit_code == 0
    assert hub.committed_files()["README.md"] == b"---\nlicense: mit\n---\n# My own card\n"
    assert run(out_dir, "--repo-id", "me/forgot", "--regenerate-card").exit_code == 0
    assert GENERATED_MARKER.encode() in hub.commits[-1]["files"]["README.md"]


def test_no_token(hub, out_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = run(out_dir, "--repo-id", "me/forgot")
    assert result.exit_code == 1 and "no Hugging Face token" in result.stderr
    assert hub.requests == []


def test_explicit_token_wins_and_is_not_echoed(hub, out_dir):
    other = "hf_OTHERtoken0987654321"
    result = run(out_dir, "--repo-id", "me/forgot", "--token", other)
    assert result.exit_code == 0, result.stderr
    assert {r["headers"].get("authorization") for r in hub.requests} == {f"Bearer {other}"}
    assert other not in result.stdout + result.stderr


def test_bad_repo_id_is_a_usage_error(out_dir):
    result = run(out_dir, "--repo-id", "just-a-name", "--dry-run")
    assert result.exit_code == 2 and "OWNER/NAME" in result.stderr


def test_local_base_card_has_no_base_model(llada_dir, forget_file, tmp_path, hub):
    out = tmp_path / "local"
    run_unlearn(build_config({}, dict(model=str(llada_dir), forget=str(forget_file), out=str(out), max_steps=1)),
                show_progress=False)
    card = (out / "README.md").read_text()
    assert GENERATED_MARKER in card and "base_model" not in _card_meta(card)
    result = run(out, "--repo-id", "me/local")
    assert result.exit_code == 0, result.stderr
    assert "the card names no base_model" in result.stderr


def test_card_carries_evaluation_results_when_present(hub, out_dir):
    (out_dir / "eval.json").write_text(json.dumps({"splits": {"forget": {"probability": 0.0123, "rouge_l": 0.1},
                                                              "retain": {"probability": 0.5, "rouge_l": 0.9}}}))
    assert run(out_dir, "--repo-id", "me/forgot").exit_code == 0
    files = hub.committed_files()
    assert "eval.json" in files
    card = files["README.md"].decode()
    assert "## Evaluation" in card and "| forget | 0.0123 | 0.1 |" in card
