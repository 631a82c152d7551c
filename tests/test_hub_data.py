"""Data files named by Hub id (hf://datasets/...), against the local fake Hub."""

import json

import pytest

from mdu_cli.data.hub import parse
from mdu_cli.data.records import load_dataset
from mdu_cli.errors import ConfigError, MduError

COMMIT = "a" * 40
RECORDS = [{"question": "Who wrote the green river?", "answer": "Zorblat Halvorsen wrote it.",
            "paraphrased_answer": "It was written by Zorblat Halvorsen.",
            "perturbed_answer": ["Tarrin Moraine wrote it.", "Iver Tamsin wrote it."]},
           {"question": "Where was Zorblat born?", "answer": "In Velloria."}]
BODY = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


@pytest.mark.parametrize("name, repo, path, revision", [
    ("hf://datasets/locuslab/TOFU/forget10.json", "locuslab/TOFU", "forget10.json", None),
    ("hf://datasets/locuslab/TOFU/forget10.json@v1.0", "locuslab/TOFU", "forget10.json", "v1.0"),
    ("hf://datasets/locuslab/TOFU@refs/pr/3/data/forget10.json", None, None, None),
    ("hf://datasets/me/my.set/sub/dir/f.jsonl@" + COMMIT, "me/my.set", "sub/dir/f.jsonl", COMMIT),
])
def test_names_are_parsed(name, repo, path, revision):
    if repo is None:  # a revision holding '/' before the path is ambiguous: it is taken up to the first '/'
        assert parse(name).revision == "refs"
        return
    got = parse(name)
    assert (got.repo_id, got.filename, got.revision) == (repo, path, revision)


@pytest.mark.parametrize("name", ["hf://datasets/locuslab/TOFU", "hf://datasets/locuslab/TOFU/", "hf://models/a/b/c.json",
                                  "hf://datasets/locuslab/TOFU/../x.json", "hf://datasets/locuslab/TOFU/f.json@",
                                  "hf://datasets/-x/TOFU/f.json", "hf://datasets/a/b//f.json"])
def test_malformed_names_are_usage_errors(name):
    with pytest.raises(ConfigError):
        parse(name)


def test_a_hub_file_loads_with_its_commit_and_hash(hub):
    hub.datasets[("locuslab/TOFU", "main")] = (COMMIT, {"forget10.json": BODY})
    data = load_dataset("hf://datasets/locuslab/TOFU/forget10.json")
    assert len(data) == 2
    assert data.records[0].paraphrased == RECORDS[0]["paraphrased_answer"]
    assert data.records[0].perturbed == tuple(RECORDS[0]["perturbed_answer"])
    assert data.records[1].source == "hf://datasets/locuslab/TOFU/forget10.json:2"
    summary = data.summary()
    import hashlib

    assert summary["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert summary["path"] == "hf://datasets/locuslab/TOFU/forget10.json"
    assert summary["hub"] == {"repo_id": "locuslab/TOFU", "repo_type": "dataset", "filename": "forget10.json",
                              "revision": None, "commit": COMMIT}
    assert str(data.path).startswith(str(hub.cache)), "the file is read from the Hugging Face cache"
    assert any(r["method"] == "GET" and r["path"].startswith("/datasets/locuslab/TOFU/resolve/main/forget10.json")
               for r in hub.requests)


def test_a_pinned_revision_is_asked_for_and_recorded(hub):
    other = "b" * 40
    hub.datasets[("locuslab/TOFU", "v1")] = (other, {"forget10.json": BODY})
    data = load_dataset("hf://datasets/locuslab/TOFU/forget10.json@v1")
    assert data.summary()["hub"]["revision"] == "v1" and data.summary()["hub"]["commit"] == other


def test_offline_reads_the_cache_and_fails_clearly_without_it(hub, monkeypatch):
    import huggingface_hub.constants

    hub.datasets[("locuslab/TOFU", "main")] = (COMMIT, {"forget10.json": BODY})
    load_dataset("hf://datasets/locuslab/TOFU/forget10.json")
    asked = len(hub.requests)
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reset_sessions()  # sessions read the offline switch when they are made
    again = load_dataset("hf://datasets/locuslab/TOFU/forget10.json")
    assert again.summary()["hub"]["commit"] == COMMIT and len(hub.requests) == asked, "offline: no request"
    with pytest.raises(MduError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        load_dataset("hf://datasets/locuslab/TOFU/retain90.json")


@pytest.mark.parametrize("name, message", [
    ("hf://datasets/locuslab/TOFU/nothing.json", "no file 'nothing.json'"),
    ("hf://datasets/nobody/none/forget10.json", "no such dataset"),
])
def test_missing_files_and_repositories_are_one_line_errors(hub, name, message):
    hub.datasets[("locuslab/TOFU", "main")] = (COMMIT, {"forget10.json": BODY})
    with pytest.raises(MduError, match=message):
        load_dataset(name)


def test_bad_records_in_a_hub_file_are_named_by_the_hub_name(hub):
    hub.datasets[("locuslab/TOFU", "main")] = (COMMIT, {"bad.json": b'{"question": "q"}\n'})
    from mdu_cli.errors import DataError

    with pytest.raises(DataError) as err:
        load_dataset("hf://datasets/locuslab/TOFU/bad.json")
    assert err.value.problems == ['hf://datasets/locuslab/TOFU/bad.json:1: missing field "answer"']


def test_a_silent_hub_times_out(hub, monkeypatch):
    import functools

    import huggingface_hub.file_download as download

    # The client retries a timed-out request five times with 1-8 s pauses; one
    # try shows the bound as well, in a test-sized time.
    monkeypatch.setattr(download, "http_backoff", functools.partial(download.http_backoff, max_retries=0))
    monkeypatch.setenv("MDU_HUB_TIMEOUT", "0.5")
    hub.silent.set()
    with pytest.raises(MduError, match="did not answer within 0.5 s"):
        load_dataset("hf://datasets/locuslab/TOFU/forget10.json")


@pytest.mark.parametrize("command", ["unlearn", "finetune", "eval"])
def test_a_malformed_hub_name_is_a_usage_error_everywhere(command, llada_dir, forget_file, tmp_path):
    from click.testing import CliRunner
    from test_hostile_inputs import snapshot

    from mdu_cli.cli import cli

    bad = "hf://datasets/locuslab/TOFU/../secrets.json"
    args = {"unlearn": ["unlearn", "--model", str(llada_dir), "--forget", bad, "--out", str(tmp_path / "out")],
            "finetune": ["finetune", "--model", str(llada_dir), "--data", bad, "--out", str(tmp_path / "out")],
            "eval": ["eval", str(llada_dir), "--forget", str(forget_file), "--retain", bad]}[command]
    before = snapshot(llada_dir, forget_file)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "must be plain (no empty, '.' or '..' parts)" in result.stderr
    assert snapshot(llada_dir, forget_file) == before and not (tmp_path / "out").exists()


def test_an_output_over_the_cached_hub_file_is_refused(hub, llada_dir, tmp_path):
    from click.testing import CliRunner

    from mdu_cli.cli import cli

    hub.datasets[("locuslab/TOFU", "main")] = (COMMIT, {"forget10.json": BODY})
    cached = load_dataset("hf://datasets/locuslab/TOFU/forget10.json").path
    snapshot_dir = cached.parent
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget",
                                      "hf://datasets/locuslab/TOFU/forget10.json", "--out", str(snapshot_dir),
                                      "--overwrite", "--max-steps", "1"])
    # A cache snapshot is no mdu output: refused before the input rule is even reached.
    assert result.exit_code == 1 and "is not an mdu output" in result.stderr
    assert cached.read_bytes() == BODY and cached.is_symlink(), "the cached data file is untouched"


def test_an_output_holding_a_link_to_the_data_is_refused(llada_dir, forget_file, tmp_path):
    """The same class locally: the forget file named through a link that lies in
    --out. Replacing --out would delete the link the user named."""
    from click.testing import CliRunner

    from mdu_cli.cli import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "forget.jsonl").symlink_to(forget_file)
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(out / "forget.jsonl"),
                                      "--out", str(out), "--overwrite", "--max-steps", "1"])
    assert result.exit_code == 1 and "holds the input" in result.stderr
    assert (out / "forget.jsonl").is_symlink() and (out / "forget.jsonl").read_bytes() == forget_file.read_bytes()
