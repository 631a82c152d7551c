"""`mdu unlearn` through the command line: runs, refusals and their messages."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import FORGET_RECORDS, fake_hub_model, write_jsonl
from safetensors.torch import load_file, save_file

from mdu_cli.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_failure(result, code, *fragments, out=None):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    if out is not None:
        assert not out.exists(), "nothing is written on failure"
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_help_of_every_command_has_examples():
    for args in ([], ["unlearn"], ["diff"], ["push"], ["eval"], ["generate"]):
        result = run(*args, "--help")
        assert result.exit_code == 0
        assert "Examples:" in result.output
    text = run("unlearn", "--help").output
    for option in ("--forget", "--retain", "--tau", "--eta", "--kl", "--alpha", "--family", "--revision",
                   "--trust-remote-code", "--max-length", "--dtype", "--device", "--config", "--json", "--overwrite"):
        assert option in text


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_end_to_end_each_family(family, family_dirs, forget_file, retain_file, tmp_path):
    out = tmp_path / "out"
    result = run("unlearn", "--model", family_dirs[family], "--forget", forget_file, "--retain", retain_file,
                 "--out", out, "--max-steps", 2, "--batch-size", 2, "--grad-accum", 1, "--tau", 2.0, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["out_dir"] == str(out) and summary["steps"] == 2
    assert summary["forget_loss"]["first"] >= 0 and summary["retain_loss"]["last"] > 0
    record = json.loads((out / "mdu_run.json").read_text())
    assert record["family"] == family and record["config"]["tau"] == 2.0


def test_human_summary_and_progress_on_stderr(llada_dir, forget_file, tmp_path):
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", tmp_path / "o", "--max-steps", 2)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"Wrote {tmp_path / 'o'} after 2 steps")
    assert "forget=" in result.stderr and "2/2" in result.stderr


def test_config_file_with_flag_override(llada_dir, forget_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {llada_dir}\nforget: forget.jsonl\nout: yaml-out\ntau: 0.5\nmax-steps: 3\n"
                      "batch-size: 2\nkl: reverse\n")
    result = run("unlearn", "--config", config, "--tau", 0.25, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "yaml-out" / "mdu_run.json").read_text())
    assert record["config"]["tau"] == 0.25 and record["config"]["kl"] == "reverse"
    assert record["steps"] == 3 and record["config"]["forget"] == str(tmp_path / "forget.jsonl")


BAD_FILES = [
    ('{"question": "q", "answer": \n', "invalid JSON"),
    ('{"question": "q"}\n', 'missing field "answer"'),
    ('{"question": "q", "answer": ""}\n', 'field "answer" is empty'),
    ('{"question": "q", "answer": ["a"]}\n', "must be a string"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n', "no final assistant turn"),
    (b'{"question": "q", "answer": "\xff"}\n', "not valid UTF-8"),
    ("", "empty"),
    ('{"records": [\n {"question": "q", "answer": "a"}\n]}\n', "not a list of records"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
@pytest.mark.parametrize("which", ["forget", "retain"])
def test_bad_data_fails_before_any_model_is_loaded(content, message, which, forget_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    files = {"forget": forget_file, "retain": forget_file, which: bad}
    out = tmp_path / "out"
    # The model does not exist: the data must be rejected before it is looked for.
    result = run("unlearn", "--model", tmp_path / "no-model", "--forget", files["forget"],
                 "--retain", files["retain"], "--out", out)
    assert_clean_failure(result, 1, f"{bad}:1:", message, out=out)


def test_every_bad_line_is_listed(tmp_path):
    bad = write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "a"}, {"question": "q"}, {"answer": 1}])
    result = run("unlearn", "--model", tmp_path, "--forget", bad)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert [line.split(":")[2] for line in lines] == ["2", "3"]
    assert all(line.startswith(f"Error: {bad}:") for line in lines)


def test_missing_forget_file(tmp_path, llada_dir):
    result = run("unlearn", "--model", llada_dir, "--forget", tmp_path / "nope.jsonl")
    assert_clean_failure(result, 1, "nope.jsonl: no such file")


def test_negative_tau_is_a_usage_error(llada_dir, forget_file):
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--tau", -1)
    assert_clean_failure(result, 2, "--tau must be >= 0")


def test_forget_is_required(llada_dir):
    assert_clean_failure(run("unlearn", "--model", llada_dir), 2, "--forget is required")


def test_missing_model(forget_file, tmp_path):
    result = run("unlearn", "--model", tmp_path / "missing-model", "--forget", forget_file, "--out", tmp_path / "o")
    assert_clean_failure(result, 1, "no such directory", out=tmp_path / "o")


def test_uncached_hub_model_offline(forget_file, tmp_path):
    result = run("unlearn", "--model", "GSAI-ML/never-downloaded", "--forget", forget_file, "--out", tmp_path / "o")
    assert_clean_failure(result, 1, "not in the Hugging Face cache while offline", out=tmp_path / "o")


def test_autoregressive_model_is_refused(causal_lm_dir, forget_file, tmp_path):
    for extra in ([], ["--family", "masked-lm"]):
        result = run("unlearn", "--model", causal_lm_dir, "--forget", forget_file, "--out", tmp_path / "o", *extra)
        assert_clean_failure(result, 1, "autoregressive", out=tmp_path / "o")


def test_out_equal_to_or_inside_base_is_refused(llada_dir, forget_file):
    before = sorted(p.name for p in llada_dir.iterdir())
    for out in (llada_dir, llada_dir / "sub"):
        result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", out, "--overwrite")
        assert_clean_failure(result, 1, "inside the base model directory")
    assert sorted(p.name for p in llada_dir.iterdir()) == before


def test_non_empty_out_needs_overwrite(llada_dir, forget_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", out, "--max-steps", 1)
    assert_clean_failure(result, 1, "is not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces an mdu output, never a directory of the user's (tests/test_hostile_inputs.py).
    (out / "keep.txt").unlink()
    assert run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", out, "--max-steps", 1).exit_code == 0
    first = (out / "mdu_run.json").read_text()
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", out, "--max-steps", 1, "--overwrite",
                 "--seed", 7)
    assert result.exit_code == 0, result.stderr
    assert (out / "mdu_run.json").read_text() != first, "the previous output was replaced"


def test_overwrite_refuses_to_delete_the_data(llada_dir, tmp_path):
    data = write_jsonl(tmp_path / "forget.jsonl", FORGET_RECORDS)
    result = run("unlearn", "--model", llada_dir, "--forget", data, "--out", tmp_path, "--overwrite")
    assert_clean_failure(result, 1, "would delete")
    assert data.exists()


def test_prompt_longer_than_max_length(llada_dir, tmp_path):
    data = write_jsonl(tmp_path / "f.jsonl", [{"question": "who ?", "answer": "me ."},
                                              {"question": " ".join(["the"] * 50), "answer": "yes ."}])
    result = run("unlearn", "--model", llada_dir, "--forget", data, "--max-length", 20, "--out", tmp_path / "o")
    assert_clean_failure(result, 1, f"{data}:2: the prompt alone is", "--max-length 20", out=tmp_path / "o")


def test_cuda_requested_without_cuda(llada_dir, forget_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--device", "cuda", "--out", tmp_path / "o")
    assert_clean_failure(result, 1, "no CUDA device", out=tmp_path / "o")


def test_nan_loss_stops_with_no_output(llada_dir, forget_file, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llada_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.transformer.ln_f.weight"] = torch.full_like(weights["model.transformer.ln_f.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    result = run("unlearn", "--model", broken, "--forget", forget_file, "--out", out, "--max-steps", 2)
    assert_clean_failure(result, 1, "loss is nan at step 1", out=out)


def test_known_publisher_remote_code_is_trusted_with_notice(hf_home, llada_dir, forget_file, tmp_path):
    commit = "1" * 40
    fake_hub_model(hf_home, "GSAI-ML/tiny-llada", llada_dir, commit)
    out = tmp_path / "o"
    result = run("unlearn", "--model", "GSAI-ML/tiny-llada", "--forget", forget_file, "--out", out, "--max-steps", 1)
    assert result.exit_code == 0, result.stderr
    assert "Notice: running the remote code of GSAI-ML/tiny-llada" in result.stderr
    record = json.loads((out / "mdu_run.json").read_text())
    assert record["base_model"] == {"id": "GSAI-ML/tiny-llada", "is_hub": True, "revision": commit, "license": None}


def test_other_publishers_need_trust_remote_code(hf_home, llada_dir, forget_file, tmp_path):
    commit = "2" * 40
    fake_hub_model(hf_home, "someone/tiny-llada", llada_dir, commit)
    out = tmp_path / "o"
    result = run("unlearn", "--model", "someone/tiny-llada", "--forget", forget_file, "--out", out, "--max-steps", 1)
    assert_clean_failure(result, 1, "--trust-remote-code", out=out)
    result = run("unlearn", "--model", "someone/tiny-llada", "--forget", forget_file, "--out", out, "--max-steps", 1,
                 "--trust-remote-code", "--revision", commit)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "mdu_run.json").read_text())["base_model"]["revision"] == commit


def test_revision_on_a_local_directory_is_a_usage_error(llada_dir, forget_file):
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--revision", "main")
    assert_clean_failure(result, 2, "--revision applies to Hub models")
