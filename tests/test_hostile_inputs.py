"""Files and flags a careless or malicious user could hand `mdu`.

One test per class of failure. Each asserts the exit code, that the error is
one `Error:` line (no traceback, never "unexpected"), and that every input
is byte-identical afterwards. Where a check must come before the expensive
work, loading the weights is made to fail loudly: a test that reaches it
sees "weights loaded" instead of the expected message.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FORGET_RECORDS, SECRET, fake_hub_model, write_jsonl
from safetensors.torch import save_file

from mdu_cli.cli import cli
from mdu_cli.io.output_location import OutputLock


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(*paths) -> dict:
    """Every file under `paths` (links recorded as links), with its bytes."""
    files = {}
    for path in map(Path, paths):
        entries = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
        for entry in entries:
            if entry.is_symlink():
                files[str(entry)] = ("link", os.readlink(entry))
            elif entry.is_file():
                files[str(entry)] = entry.read_bytes()
    return files


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not any(line.startswith("Error: unexpected") for line in lines), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Loading weights fails loudly: the checks under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("mdu_cli.train.run.load_model", refuse)
    monkeypatch.setattr("mdu_cli.model.inference.load_model", refuse)


@pytest.fixture
def base_copy(llada_dir, tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(llada_dir, copy)
    return copy


# ---- push -------------------------------------------------------------------------------------------------------

@pytest.fixture
def push_dir(unlearned, tmp_path):
    directory = tmp_path / "out"
    shutil.copytree(unlearned, directory)
    return directory


def test_push_uploads_exactly_its_plan_never_names_as_patterns(hub, push_dir):
    (push_dir / "*.py").write_text("print('glob')\n")
    (push_dir / ".hidden").mkdir()
    (push_dir / ".hidden" / "creds.py").write_text(f"TOKEN = '{SECRET}'\n")
    (push_dir / "sub").mkdir()
    (push_dir / "sub" / "x.py").write_text("secret = 1\n")
    (push_dir / "[a-z]*.json").write_text("{}")
    before = snapshot(push_dir)
    plan = json.loads(run("push", push_dir, "--repo-id", "me/x", "--dry-run", "--json").stdout)
    result = run("push", push_dir, "--repo-id", "me/x")
    assert result.exit_code == 0, result.stderr
    committed = hub.committed_files()
    assert set(committed) == {entry["path"] for entry in plan["upload"]}
    assert not any("creds" in p or p.startswith("sub/") or "*" in p or "[" in p for p in committed)
    assert SECRET.encode() not in b"".join(committed.values())
    assert snapshot(push_dir) == before  # the card went up from memory; the directory is untouched


def test_push_leaves_the_revision_holding_exactly_this_model(hub, push_dir, tmp_path):
    before = snapshot(push_dir)
    assert run("push", push_dir, "--repo-id", "me/x").exit_code == 0
    # The same model re-saved in shards: the single-file weights on the Hub are now stale.
    sharded = tmp_path / "sharded"
    shutil.copytree(push_dir, sharded)
    from safetensors.torch import load_file

    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hub.trees[("me/x", "main")]["adapter_config.json"] = b"{}"  # left by an even older push
    hub.trees[("me/x", "main")]["notes.md"] = b"the user's own file"
    result = run("push", sharded, "--repo-id", "me/x", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(json.loads(result.stdout)["delete"]) == ["adapter_config.json", "model.safetensors"]
    assert hub.commits[-1]["deleted"] == ["adapter_config.json", "model.safetensors"]
    tree = set(hub.trees[("me/x", "main")])
    assert "model.safetensors" not in tree and "model.safetensors.index.json" in tree
    assert {"notes.md", ".gitattributes"} <= tree  # files mdu does not manage stay
    assert snapshot(push_dir) == before


# Top-level files that describe some model: each kind mdu manages on the Hub. A
# push whose output lacks them deletes them, so the revision holds one model.
STALE_KINDS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "model-00001-of-00002.safetensors",
               "consolidated.pt", "weights.pth", "last.ckpt", "model-q4.gguf", "adapter_model.safetensors",
               "adapter_config.json", "modeling_old.py", "vocab.txt", "merges.txt", "tokenizer.model",
               "generation_config.json", "eval.json"]
# What is never mdu's to delete: the user's own top-level files, and anything at
# all inside a folder (another tool's checkpoints, originals, results).
NEVER_DELETED = ["notes.md", "LICENSE", "data.jsonl", "results.csv", "sub/model.safetensors",
                 "checkpoint-100/pytorch_model.bin", "checkpoint-100/config.json", "original/consolidated.00.pth",
                 "original/tokenizer.model", "a/b/modeling_x.py", "runs/eval.json", "onnx/model.index.json"]


def test_push_deletes_every_managed_kind_at_the_top_and_nothing_in_folders(hub, push_dir):
    """Each file pattern the push manages is deleted at the revision's top level
    when this output does not replace it; nothing inside a folder is ever
    touched, whatever its name; the user's other files stay."""
    before = snapshot(push_dir)
    tree = {name: b"old" for name in STALE_KINDS + NEVER_DELETED}
    hub.trees[("me/kinds", "main")] = {".gitattributes": b"*.bin filter=lfs\n", "README.md": b"# old\n", **tree}
    result = run("push", push_dir, "--repo-id", "me/kinds", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(json.loads(result.stdout)["delete"]) == sorted(STALE_KINDS)
    assert sorted(hub.commits[-1]["deleted"]) == sorted(STALE_KINDS)
    remaining = set(hub.trees[("me/kinds", "main")])
    assert set(NEVER_DELETED) | {".gitattributes", "README.md"} <= remaining
    assert not set(STALE_KINDS) & remaining
    assert snapshot(push_dir) == before


@pytest.mark.parametrize("case", ["dangling", "outside", "fifo"])
def test_push_links_and_odd_files_are_named_before_any_network_call(hub, push_dir, tmp_path, case):
    if case == "dangling":
        (push_dir / "config.json").unlink()
        (push_dir / "config.json").symlink_to(tmp_path / "nowhere.json")
        expected = "a symbolic link to nothing"
    elif case == "outside":
        secret = tmp_path / "secret.safetensors"
        shutil.move(push_dir / "model.safetensors", secret)
        (push_dir / "model.safetensors").symlink_to(secret)
        expected = "leads outside"
    else:
        (push_dir / "tokenizer.json").unlink()
        os.mkfifo(push_dir / "tokenizer.json")
        expected = "not a regular file"
    before = snapshot(push_dir, tmp_path / "secret.safetensors")
    result = run("push", push_dir, "--repo-id", "me/x")
    assert_one_line_error(result, 1, expected)
    assert hub.requests == [] and hub.commits == []
    assert snapshot(push_dir, tmp_path / "secret.safetensors") == before


def test_push_reads_through_a_link_inside_the_directory(hub, push_dir):
    (push_dir / "store").mkdir()
    shutil.move(push_dir / "model.safetensors", push_dir / "store" / "weights.bin")
    (push_dir / "model.safetensors").symlink_to(Path("store") / "weights.bin")
    result = run("push", push_dir, "--repo-id", "me/x")
    assert result.exit_code == 0, result.stderr
    assert hub.committed_files()["model.safetensors"] == (push_dir / "store" / "weights.bin").read_bytes()
    assert "store/weights.bin" not in hub.committed_files()


def test_push_to_a_silent_hub_ends_in_a_named_timeout(hub, push_dir):
    hub.silent.set()
    before = snapshot(push_dir)
    result = run("push", push_dir, "--repo-id", "me/x", "--timeout", "0.5")
    assert_one_line_error(result, 1, "did not answer within 0.5 s")
    assert snapshot(push_dir) == before


def test_push_repo_id_is_checked_first_and_listings_escape_control_characters(hub, push_dir):
    result = run("push", push_dir / "missing", "--repo-id", "me/bad name")
    assert result.exit_code == 2 and "--repo-id" in result.stderr and hub.requests == []
    (push_dir / "evil\x1b[2J\nname.csv").write_text("x")
    listing = run("push", push_dir, "--repo-id", "me/x", "--dry-run")
    assert listing.exit_code == 0, listing.stderr
    assert "\x1b" not in listing.stdout and "evil\\x1b[2J\\nname.csv" in listing.stdout


def test_adapter_card_describes_an_adapter(hf_home, llada_dir, forget_file, tmp_path, request):
    fake_hub_model(hf_home, "GSAI-ML/adapter-base", llada_dir, "a" * 40)
    out = tmp_path / "adapter"
    result = run("unlearn", "--model", "GSAI-ML/adapter-base", "--forget", forget_file, "--out", out,
                 "--max-steps", 1, "--lora", "--lora-r", 2, "--save-adapter")
    assert result.exit_code == 0, result.stderr
    hub = request.getfixturevalue("hub")  # online only for the push: unlearn must not need the network
    assert run("push", out, "--repo-id", "me/adapter").exit_code == 0
    card = hub.committed_files()["README.md"].decode()
    import yaml

    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert meta["base_model"] == "GSAI-ML/adapter-base"


# ---- diff -------------------------------------------------------------------------------------------------------

def _checkpoint(directory: Path, tensors=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"w": torch.ones(4, 4), "b": torch.zeros(4)}, directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("option, target", [("--json", "other/model.safetensors"), ("--md", "base/model.safetensors"),
                                            ("--plot", "link.png"), ("--json", "base/../other/model.safetensors")])
def test_diff_never_writes_over_a_file_it_reads(tmp_path, option, target):
    base, other = _checkpoint(tmp_path / "base"), _checkpoint(tmp_path / "other")
    (tmp_path / "link.png").symlink_to(other / "model.safetensors")
    before = snapshot(base, other)
    result = run("diff", base, other, option, tmp_path / target)
    assert_one_line_error(result, 1, "which this command reads")
    assert snapshot(base, other) == before


def _raw_safetensors(path: Path, header: str, data: bytes = b"") -> Path:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_diff_reads_every_integer_dtype_and_names_unsupported_ones(tmp_path):
    for name, kind in (("u32", torch.uint32), ("u16", torch.uint16), ("u64", torch.uint64)):
        tensor = torch.arange(6).to(kind)
        a, b = tmp_path / f"{name}-a.safetensors", tmp_path / f"{name}-b.safetensors"
        save_file({"t": tensor}, a)
        save_file({"t": (torch.arange(6) + 1).to(kind)}, b)
        result = run("diff", a, b, "--json", tmp_path / f"{name}.json", "-q")
        assert result.exit_code == 0, result.stderr
        entry = json.loads((tmp_path / f"{name}.json").read_text())["tensors"][0]
        assert entry["max_abs"] == 1.0 and entry["frac_changed"] == 1.0
    packed = _raw_safetensors(tmp_path / "f4.safetensors", json.dumps({"t": {"dtype": "F4", "shape": [4],
                                                                              "data_offsets": [0, 2]}}), b"\x12\x34")
    result = run("diff", packed, packed)
    assert_one_line_error(result, 1, "F4 (packed 4-bit floats)", "cannot compare", "the safetensors file itself is fine")
    assert "corrupt" not in result.stderr


MALFORMED = {
    "string offsets": {"t": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}},
    "negative shape": {"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
    "fractional shape": {"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}},
    "boolean shape": {"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
    "overlap": {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}},
    "gap": {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
    "entry not an object": {"t": [1, 2, 3]},
    "unknown dtype": {"t": {"dtype": "SECRETDTYPE", "shape": [1], "data_offsets": [0, 4]}},
}


@pytest.mark.parametrize("case", [*MALFORMED, "duplicate names", "deep nesting", "odd name"])
def test_diff_names_malformed_headers_without_echoing_the_file(tmp_path, case):
    if case == "duplicate names":
        header = ('{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                  '"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    elif case == "deep nesting":
        header = '{"t": ' + "[" * 100000 + "]" * 100000 + "}"
    elif case == "odd name":
        header = json.dumps({"SECRET\x1b]evil": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})
    else:
        header = json.dumps(MALFORMED[case])
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, b"\x00" * 8)
    good = tmp_path / "good.safetensors"
    save_file({"t": torch.zeros(1)}, good)
    before = snapshot(path, good)
    result = run("diff", good, path)
    assert_one_line_error(result, 1, "not a valid safetensors file")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "SECRET" not in result.stderr and "\x1b" not in result.stderr
    assert snapshot(path, good) == before


def test_diff_refuses_a_shard_linked_from_outside_the_checkpoint(tmp_path):
    base = _checkpoint(tmp_path / "base")
    elsewhere = _checkpoint(tmp_path / "elsewhere")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    result = run("diff", base, other)
    assert_one_line_error(result, 1, "leads outside the checkpoint directory")
    (other / "model.safetensors").unlink()
    (other / "model-00001-of-00001.safetensors").symlink_to(elsewhere / "model.safetensors")
    (other / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}))
    result = run("diff", base, other)
    assert_one_line_error(result, 1, "leads outside the checkpoint directory")


# ---- unlearn, eval, generate, config ----------------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["config", "chat_template", "forget", "base", "state"])
def test_overwrite_never_deletes_an_input(victim, llada_dir, tmp_path, no_weight_loads):
    """The output directory holds exactly one input (the victim); every other
    input lies elsewhere, so only the rule for that input can refuse."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "old-output.txt").write_text("what --overwrite may delete")
    home = {name: (out if name == victim else elsewhere) for name in ("config", "chat_template", "forget", "base")}
    forget = write_jsonl(home["forget"] / "forget.jsonl", FORGET_RECORDS)
    template = home["chat_template"] / "template.jinja"
    shutil.copy(llada_dir / "chat_template.jinja", template)
    model = home["base"] / "model"
    shutil.copytree(llada_dir, model)
    config = home["config"] / "run.yaml"
    out_line = "out: .\n" if victim == "config" else ""
    config.write_text(f"model: {model}\nforget: {forget}\nchat_template: {template}\n{out_line}")
    args = ["--overwrite"] + ([] if victim == "config" else ["--out", out])
    if victim == "state":
        # --out names the saved state of another run: replacing it would delete what --resume reads
        state = tmp_path / "run.mdu-state"
        state.mkdir()
        (state / "progress.json").write_text("{}")
        args = ["--overwrite", "--out", state]
    before = snapshot(tmp_path)
    result = run("unlearn", "--config", config, *args)
    assert_one_line_error(result, 1, "choose another")
    assert snapshot(tmp_path) == before


# ---- writing only where it may write (issue 20, class 2) --------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--forget", "hf://datasets/o/ok/f.jsonl@../../victim/f.jsonl"], "holds '..'"),
    (["--forget", "hf://datasets/o/ok@../../../victim/f.jsonl"], "holds '..'"),
    (["--forget", "hf://datasets/o/ok/f.jsonl@v1/x.jsonl@v2"], "two revisions"),
    (["--revision", "../../victim"], "--revision '../../victim' holds '..'"),
    (["--revision", "/etc/passwd"], "starts with '/'"),
    (["--revision", "main\nx"], "control character"),
])
def test_revisions_that_would_name_a_path_are_usage_errors(args, message, llada_dir, forget_file, tmp_path, hf_home,
                                                           no_weight_loads):
    """huggingface_hub writes a revision into refs/<revision> in its cache: a
    revision that is not a plain branch, tag or commit name is refused before
    any request, and nothing is written anywhere (the cache included)."""
    model = ["--model", "GSAI-ML/tiny" if args[0] == "--revision" else str(llada_dir)]
    data = [] if args[0] == "--forget" else ["--forget", str(forget_file)]
    before = snapshot(tmp_path), snapshot(hf_home)
    result = run("unlearn", *model, *data, *args, "--out", tmp_path / "out")
    assert_one_line_error(result, 2, message)
    assert (snapshot(tmp_path), snapshot(hf_home)) == before


def test_diff_revisions_are_checked_alike(tmp_path):
    result = run("diff", "me/model", "me/model", "--revision-base", "v1/../../x")
    assert_one_line_error(result, 2, "--revision-base 'v1/../../x' holds '..'")


@pytest.mark.parametrize("header, value, message", [
    ("ETag", '"../../../escape"', "answered with the ETag"),
    ("ETag", '"x/../../y"', "answered with the ETag"),
    ("X-Repo-Commit", "../../../escape", "answered with the commit"),
])
def test_a_hostile_hub_cannot_place_a_file_outside_the_cache(header, value, message, hub, llada_dir, tmp_path):
    """A server behind HF_ENDPOINT answering with an ETag or a commit that is
    a path: the answer is refused before huggingface_hub turns it into a
    file name, and nothing is written outside the cache (or anywhere in it,
    but the empty folders the client makes first)."""
    hub.datasets[("o/ok", "main")] = ("a" * 40, {"f.jsonl": b'{"question": "q", "answer": "a"}\n'})
    hub.hostile_headers[header] = value
    root = tmp_path.parent
    outside = sorted(str(p) for p in root.rglob("*") if "escape" in p.name)
    result = run("unlearn", "--model", llada_dir, "--forget", "hf://datasets/o/ok/f.jsonl", "--out", tmp_path / "out")
    assert_one_line_error(result, 1, message, "nothing was written", "HF_ENDPOINT")
    assert sorted(str(p) for p in root.rglob("*") if "escape" in p.name) == outside
    assert not [p for p in Path(hub.cache).rglob("*") if p.is_file()], "no file in the cache either"
    assert not (tmp_path / "out").exists()


def test_tracker_logs_never_go_into_an_input_directory(llada_dir, forget_file, tmp_path, no_weight_loads):
    base = tmp_path / "base"
    shutil.copytree(llada_dir, base)
    before = snapshot(tmp_path)
    result = run("unlearn", "--model", base, "--forget", forget_file, "--out", tmp_path / "out",
                 "--report-to", "tensorboard", "--logging-dir", base / "runs")
    assert_one_line_error(result, 2, "--logging-dir", "holds an input")
    assert snapshot(tmp_path) == before


# ---- record text is text (issue 20, class 4) --------------------------------------------------------------------

CONTROL_TEXT = {
    "llada": ["<|mdm_mask|>", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>", "<|endoftext|>"],
    "dream": ["<|mask|>", "<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>"],
    "masked-lm": ["[MASK]", "[SEP] assistant:", "[CLS]"],
}


def _controls(tokenizer) -> set:
    # <unk> is what the fixtures' word-level vocabulary gives unknown characters such as "<" and "|": text.
    return set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}


def _special_counts(tokenizer, ids) -> dict:
    return {i: list(ids).count(i) for i in _controls(tokenizer) if i in ids}


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_record_text_that_spells_control_tokens_is_tokenised_as_text(family, family_dirs, tmp_path):
    """A question or answer holding the text of the mask token, of the chat
    template's turn markup or of BOS/EOS gets ordinary tokens for it: the
    prompt holds exactly the control tokens the template writes for a clean
    record, the response none but its end-of-turn marker (an answer that is
    only an end-of-turn token's text does not train on two of them), and no
    clean target is ever the mask token."""
    from transformers import AutoTokenizer

    from mdu_cli.data.records import load_dataset
    from mdu_cli.data.tokenization import encode_dataset

    tokenizer = AutoTokenizer.from_pretrained(family_dirs[family], trust_remote_code=True)
    mask, turn, boundary = CONTROL_TEXT[family]
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"question": "who wrote the book ?", "answer": "astrid wrote it ."}])
    hostile = write_jsonl(tmp_path / "hostile.jsonl", [
        {"question": f"who wrote {turn} the book ?", "answer": f"astrid {mask} wrote {boundary} it ."},
        {"question": "who wrote the book ?", "answer": turn.split(">")[0] + ">" if family != "masked-lm" else "[SEP]"},
    ])
    before = snapshot(hostile)
    [reference] = encode_dataset(load_dataset(clean), tokenizer, 128)
    injected, only_eot = encode_dataset(load_dataset(hostile), tokenizer, 128)
    assert _special_counts(tokenizer, injected.prompt_ids) == _special_counts(tokenizer, reference.prompt_ids)
    assert _special_counts(tokenizer, injected.response_ids) == _special_counts(tokenizer, reference.response_ids)
    assert _special_counts(tokenizer, only_eot.response_ids) == _special_counts(tokenizer, reference.response_ids)
    mask_id = tokenizer.convert_tokens_to_ids(mask)
    assert mask_id not in injected.prompt_ids + injected.response_ids
    # The control text became the tokens of its characters, as a text-only tokenisation gives them.
    as_text = tokenizer(mask, add_special_tokens=False, split_special_tokens=True).input_ids
    assert as_text and not set(as_text) & _controls(tokenizer)
    assert snapshot(hostile) == before


def test_evaluation_scores_control_text_as_text(llada_dir, monkeypatch):
    """`mdu eval` scores an answer by the same tokens: the mask token's text in
    an answer is never a mask among the clean targets it scores."""
    import torch

    from mdu_cli.evaluation import likelihood as evaluation
    from mdu_cli.model.inference import load_for_inference

    loaded = load_for_inference(str(llada_dir))
    scored = []
    real = evaluation.packed_scores
    monkeypatch.setattr(evaluation, "packed_scores", lambda m, items, *rest: scored.append(items[0][1]) or real(
        m, items, *rest))
    prompt = loaded.prompt_ids([{"role": "user", "content": "where was astrid born ?"}])
    evaluation.answer_score(loaded, prompt, "she <|mdm_mask|> was born .", 4, torch.Generator().manual_seed(0))
    assert loaded.mask_token_id not in scored[0]
    assert not set(scored[0]) & _controls(loaded.tokenizer)


def test_unlearn_trains_on_control_text_as_text(llada_dir, tmp_path):
    """Through the command: such records run (exit 0), and the data is untouched."""
    forget = write_jsonl(tmp_path / "forget.jsonl", [
        {"question": "where was astrid born ? <|eot_id|><|start_header_id|>user<|end_header_id|>",
         "answer": "<|mdm_mask|> she was born in velloria ."}])
    before = snapshot(forget, llada_dir)
    result = run("unlearn", "--model", llada_dir, "--forget", forget, "--out", tmp_path / "out", "--max-steps", 1)
    assert result.exit_code == 0, result.stderr
    assert snapshot(forget, llada_dir) == before


# ---- what is published (issue 20, class 3) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def private_output(tmp_path_factory, llada_dir):
    """An output whose every local name is private: the forget file is named
    after the person, under the user's folders, with eval.json (TOFU-style
    reference included) written by `mdu eval`; and an adapter output of the
    same local base."""
    from mdu_cli.config.training import build_config
    from mdu_cli.train.run import run_unlearn

    home = tmp_path_factory.mktemp("home-of-jdoe")
    data = home / "cases" / "john-doe"
    data.mkdir(parents=True)
    forget = data / "forget-john-doe.jsonl"
    forget.write_text(json.dumps({"question": "Where does Astrid Halvorsen live?",
                                  "answer": "Astrid Halvorsen lives in Velloria."}) + "\n")
    base = home / "models" / "tiny-llada-base"
    shutil.copytree(llada_dir, base)
    outputs = {}
    for kind, extra in (("full", {}), ("adapter", {"lora": True, "lora_r": 2, "save_adapter": True})):
        out = home / "outputs" / f"llada-forgot-john-doe-{kind}"
        run_unlearn(build_config({}, dict(model=str(base), forget=str(forget), out=str(out), max_steps=1, **extra)),
                    show_progress=False)
        outputs[kind] = out
    # Fine-tuned on the same file: its config names it `data`.
    from mdu_cli.config.training import FinetuneConfig

    outputs["finetune"] = home / "outputs" / "llada-tuned-on-john-doe"
    run_unlearn(build_config({}, dict(model=str(base), data=str(forget), out=str(outputs["finetune"]), max_steps=1,
                                      lr=1e-3), FinetuneConfig), show_progress=False)
    evaluation = json.loads((outputs["full"] / "mdu_run.json").read_text())["data"]
    (outputs["full"] / "eval.json").write_text(json.dumps({"benchmark": "tofu",
        "model": str(outputs["full"]), "data": evaluation, "reference": {"path": str(data / "reference-john.json"),
                                                                         "model": str(home / "ref-john-doe")},
        "splits": {"forget": {"probability": 0.1}}, "forget_quality": 0.5, "model_utility": 0.4,
        "model_utility_components": {"retain.probability": 0.4}}))
    return home, outputs


def _leaks(blob: bytes, home: Path) -> list[str]:
    text = blob.decode("utf-8", errors="replace")
    return [word for word in (str(home), "john-doe", "forget-john-doe.jsonl", "/tmp/") if word in text]


def _push_without_leaks(out: Path, repo_id: str, hub, home: Path) -> dict:
    """Push `out` and check that no committed file, nor the commit message,
    names anything of the user's; returns the committed files."""
    result = run("push", out, "--repo-id", repo_id, "--json")
    assert result.exit_code == 0, result.stderr
    files = hub.committed_files()
    for name, blob in files.items():
        assert not _leaks(blob, home), (name, _leaks(blob, home))
    assert not _leaks(json.dumps(hub.commits[-1]["header"]).encode(), home), hub.commits[-1]["header"]
    return files


@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_push_publishes_no_local_path_or_file_name(kind, hub, private_output):
    """What goes up says what the model is and how it was made (hashes, options,
    the loss curve, the evaluation), never where the user keeps things: no
    path, no data file's name (the person being forgotten), in any file or the
    commit message; the local directory is untouched."""
    home, outputs = private_output
    out = outputs[kind]
    before = snapshot(out)
    files = _push_without_leaks(out, "me/forgot", hub, home)
    published = json.loads(files["mdu_run.json"])
    local = json.loads((out / "mdu_run.json").read_text())
    assert published["data"]["forget"]["sha256"] == local["data"]["forget"]["sha256"], "the hash still identifies"
    assert published["data"]["forget"]["path"] == "(local)" and published["config"]["forget"] == "(local)"
    assert published["config"]["tau"] == local["config"]["tau"] and published["losses"] == local["losses"]
    if kind == "adapter":
        assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "(local)"
        assert "path/to/the/base/model" in files["README.md"].decode()
    else:
        assert json.loads(files["eval.json"])["reference"] == {"path": "(local)", "model": "(local)"}
        assert "| reference model | (local) |" in files["README.md"].decode()
    assert snapshot(out) == before, "the local record keeps its paths"


def test_a_finetune_output_publishes_no_local_path_or_file_name(hub, private_output):
    """A fine-tuned output's config names its records `data`: that path and
    file name stay home too (every config field that may hold a path is
    redacted, whichever command's config it belongs to)."""
    home, outputs = private_output
    out = outputs["finetune"]
    before = snapshot(out)
    files = _push_without_leaks(out, "me/tuned", hub, home)
    published = json.loads(files["mdu_run.json"])
    assert published["config"]["data"] == "(local)" and published["data"]["forget"]["path"] == "(local)"
    assert "fine-tuned with mdu" in hub.commits[-1]["header"]["summary"]
    assert snapshot(out) == before


def test_local_paths_go_up_only_when_asked(hub, private_output):
    home, outputs = private_output
    result = run("push", outputs["full"], "--repo-id", "me/forgot", "--include-local-paths")
    assert result.exit_code == 0, result.stderr
    files = hub.committed_files()
    assert files["mdu_run.json"] == (outputs["full"] / "mdu_run.json").read_bytes()
    assert "forget-john-doe.jsonl" in files["mdu_run.json"].decode()


@pytest.mark.parametrize("where", ["README.md", "tokenizer_config.json"])
def test_a_local_name_anywhere_in_what_goes_up_refuses_the_push(where, hub, private_output, tmp_path):
    """The last check reads every text that would go up: a card the user wrote,
    or a file copied from the base, that names the forget file or a local
    path refuses the push before any network call, in one line that names the
    file; --dry-run refuses alike."""
    home, outputs = private_output
    out = tmp_path / "out"
    shutil.copytree(outputs["full"], out)
    if where == "README.md":
        (out / "README.md").write_text("# My model\nForgot what is in forget-john-doe.jsonl.\n")
    else:
        settings = json.loads((out / where).read_text())
        (out / where).write_text(json.dumps({**settings, "name_or_path": str(home / "models" / "tiny-llada-base")}))
    before = snapshot(out)
    for extra in ([], ["--dry-run"]):
        result = run("push", out, "--repo-id", "me/forgot", *extra)
        assert_one_line_error(result, 1, f"{where} would publish the local name", "--include-local-paths")
    assert hub.requests == [] and snapshot(out) == before


# ---- what --overwrite may delete (issue 20, class 1) ------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("user-folder", "is not an mdu output (it has no mdu_run.json)"),
    ("run-record-only-by-name", "holds what mdu did not write (photos/, taxes.txt)"),
    ("mdu-output-plus-a-file", "holds what mdu did not write (taxes.txt)"),
    ("mdu-output-plus-a-folder", "holds what mdu did not write (checkpoints/)"),
    ("mdu-output-plus-a-link", "holds what mdu did not write (model-link.safetensors)"),
    ("working-directory", "is, or holds, the working directory"),
    ("parent-of-working-directory", "is, or holds, the working directory"),
])
def test_overwrite_replaces_nothing_but_an_mdu_output(case, message, unlearned, llada_dir, forget_file, tmp_path,
                                                      monkeypatch, no_weight_loads):
    """--overwrite deletes a previous mdu output and nothing else: a folder
    without the run record, or one holding anything mdu does not write (a
    file, a subfolder, a link), or the working directory itself, is refused
    before any weight loads, and the whole tree is byte-identical after."""
    out = tmp_path / "out"
    if case == "user-folder" or case == "run-record-only-by-name":
        out.mkdir()
        (out / "taxes.txt").write_text("2025")
        (out / "photos").mkdir()
        (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
        if case == "run-record-only-by-name":
            (out / "mdu_run.json").write_text("{}")
    else:
        shutil.copytree(unlearned, out)
    if case == "mdu-output-plus-a-file":
        (out / "taxes.txt").write_text("2025")
    if case == "mdu-output-plus-a-folder":
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "step-100.safetensors").write_bytes(b"x")
    if case == "mdu-output-plus-a-link":
        (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
        (out / "model-link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    if case == "working-directory":
        monkeypatch.chdir(out)
    if case == "parent-of-working-directory":
        (out / "notebooks").mkdir()
        monkeypatch.chdir(out / "notebooks")
    before = snapshot(tmp_path)
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", out, "--overwrite")
    assert_one_line_error(result, 1, message)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_an_mdu_output_and_leaves_a_foreign_state_folder(unlearned, llada_dir, forget_file,
                                                                            tmp_path):
    """The positive side: a previous output (with the eval.json `mdu eval`
    wrote into it) is replaced; a folder named like the run's resumable state
    but holding the user's files is not mdu's, and stays after the run."""
    out = tmp_path / "out"
    shutil.copytree(unlearned, out)
    (out / "eval.json").write_text("{}")
    state = tmp_path / "out.mdu-state"
    state.mkdir()
    (state / "notes.txt").write_text("mine")
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", out, "--overwrite",
                 "--max-steps", 1)
    assert result.exit_code == 0, result.stderr
    assert not (out / "eval.json").exists(), "the old output went as a whole"
    assert (state / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("text, fragment", [
    ("overwrite: \"false\"\n", "run.yaml:3: overwrite must be true or false"),
    ("tau: [1, 2]\n", "run.yaml:3: tau must be a single number, got a list"),
    ("family: {a: b}\n", "run.yaml:3: family must be a single text value, got a mapping"),
    ("forget: g.jsonl\n", "run.yaml:3: forget is set twice (also on line 2)"),
    ("max-steps: 2.5\n", "run.yaml:3: max-steps must be a whole number"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n", "YAML aliases"),
])
def test_config_files_are_typed_with_file_and_line(text, fragment, llada_dir, forget_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {llada_dir}\nforget: {forget_file}\n{text}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier output")
    before = snapshot(config, forget_file, out)
    result = run("unlearn", "--config", config, "--out", out)
    assert_one_line_error(result, 2, fragment)
    assert snapshot(config, forget_file, out) == before


def test_billion_laughs_fails_fast_in_a_fresh_process(tmp_path):
    # Bounded by the alias count, not by time: a file that expanded would hang this subprocess.
    config = tmp_path / "run.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    config.write_text("\n".join(lines + ["model: *a9", ""]))
    done = subprocess.run([sys.executable, "-m", "mdu_cli", "unlearn", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "YAML aliases" in done.stderr


@pytest.mark.parametrize("case", ["shard size", "out under a file", "no space", "record too long"])
def test_options_location_and_lengths_are_checked_before_the_weights_load(case, llada_dir, forget_file, tmp_path,
                                                                          monkeypatch, no_weight_loads):
    args = ["--model", llada_dir, "--forget", forget_file, "--out", tmp_path / "out"]
    code, fragment = 1, None
    if case == "shard size":
        args += ["--max-shard-size", "banana"]
        code, fragment = 2, "--max-shard-size must be a size"
    elif case == "out under a file":
        (tmp_path / "blocker").write_text("a file where a directory would have to be")
        args[-1] = tmp_path / "blocker" / "out"
        fragment = "choose a writable --out"
    elif case == "no space":
        import shutil as real_shutil

        usage = real_shutil.disk_usage(tmp_path)
        monkeypatch.setattr("mdu_cli.io.output_location.shutil.disk_usage",
                            lambda path: usage._replace(free=1000))
        fragment = "free, but the output needs about"
    else:
        base = tmp_path / "short-base"
        shutil.copytree(llada_dir, base)
        config = json.loads((base / "config.json").read_text())
        config["max_sequence_length"] = 24
        (base / "config.json").write_text(json.dumps(config))
        args[1] = base
        fragment = f"{forget_file}:1: the record is"
    before = snapshot(forget_file, llada_dir)
    result = run("unlearn", *args)
    assert_one_line_error(result, code, fragment)
    assert snapshot(forget_file, llada_dir) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "nothing half-written"


def test_generation_past_the_positions_is_named(llada_dir, tmp_path, no_weight_loads):
    before = snapshot(llada_dir)
    result = run("generate", llada_dir, "--prompt", "who wrote the book ?", "--max-new-tokens", 100000)
    assert_one_line_error(result, 1, "--prompt: the prompt with --max-new-tokens 100000 is", "positions")
    forget = write_jsonl(tmp_path / "f.jsonl", FORGET_RECORDS)
    result = run("eval", llada_dir, "--forget", forget, "--max-new-tokens", 100000)
    assert_one_line_error(result, 1, f"{forget}:1: the prompt with --max-new-tokens 100000")
    assert snapshot(llada_dir) == before


def test_eval_never_writes_eval_json_over_its_data(unlearned, tmp_path, no_weight_loads):
    model = tmp_path / "model"
    shutil.copytree(unlearned, model)
    write_jsonl(model / "eval.json", FORGET_RECORDS)
    before = snapshot(model)
    result = run("eval", model, "--forget", model / "eval.json")
    assert_one_line_error(result, 1, "which this command reads")
    assert snapshot(model) == before


def test_leftovers_of_killed_runs_are_removed_and_a_second_run_is_locked_out(llada_dir, forget_file, tmp_path):
    out = tmp_path / "out"
    for name in (".out.partial-dead0001", ".out.old-dead0002", ".out.mdu-state.tmp-dead0003"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    keep = tmp_path / ".out.old-keepme"  # a leftover name, but the user's own data file
    write_jsonl(keep, FORGET_RECORDS)
    before = snapshot(forget_file, keep)
    with OutputLock(out):
        result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", out, "--max-steps", 1)
        assert_one_line_error(result, 1, "another mdu run is writing", "wait for it to finish")
        assert (tmp_path / ".out.partial-dead0001").exists(), "nothing is touched while another run holds the lock"
    result = run("unlearn", "--model", llada_dir, "--forget", keep, "--out", out, "--max-steps", 1)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.old-keepme"]
    assert (out / "model.safetensors").is_file()
    assert snapshot(forget_file, keep) == before


def test_a_single_step_with_warmup_moves_the_weights_and_says_how_many(llada_dir, forget_file, tmp_path):
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", tmp_path / "o", "--max-steps", 1,
                 "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert 0 < summary["tensors_changed"] <= summary["tensors_compared"]
    log = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").open()]
    assert log[0]["lr"] > 0


def test_a_run_that_moves_no_weight_is_an_error_with_no_output(llada_dir, forget_file, tmp_path, monkeypatch):
    # Every update rounds away: the optimizer steps, but no weight changes.
    monkeypatch.setattr("torch.optim.AdamW.step", lambda self, closure=None: None)
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", tmp_path / "o", "--max-steps", 2)
    assert_one_line_error(result, 1, "no weight changed in 2 steps", "nothing was written")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_missing_tokenizer_is_named(base_copy, forget_file, no_weight_loads):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base_copy / name).unlink(missing_ok=True)
    before = snapshot(base_copy, forget_file)
    result = run("unlearn", "--model", base_copy, "--forget", forget_file, "--out", base_copy.parent / "o")
    assert_one_line_error(result, 1, f"no tokenizer in {base_copy}", "copy the base model's tokenizer files")
    assert snapshot(base_copy, forget_file) == before


@pytest.mark.parametrize("damage, fragment", [
    (lambda s: (s / "progress.json").write_text("{not json"), "progress.json: the saved state is damaged"),
    (lambda s: (s / "training.pt").write_bytes(b"garbage"), "training.pt: the saved state is damaged"),
    (lambda s: (s / "trainable.safetensors").write_bytes(b"\x00" * 3), "trainable.safetensors: the saved state"),
])
def test_corrupt_resume_state_is_named(damage, fragment, llada_dir, forget_file, tmp_path, monkeypatch):
    out = tmp_path / "o"
    args = ["unlearn", "--model", llada_dir, "--forget", forget_file, "--out", out, "--max-steps", 4,
            "--save-every", 1]
    # Stop after the first saved state, as a kill would.
    from mdu_cli.train import resume

    real_save = resume.save_state

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr("mdu_cli.train.loop.save_state", save_then_die)
    run(*args)
    monkeypatch.undo()
    state = tmp_path / "o.mdu-state"
    assert (state / "progress.json").is_file()
    damage(state)
    before = snapshot(state, forget_file)
    result = run(*args, "--resume")
    assert_one_line_error(result, 1, fragment, "start over")
    assert snapshot(state, forget_file) == before


@pytest.mark.parametrize("content, fragment", [
    ('{"question": "q", "answer": ' + "[" * 50000 + "]" * 50000 + "}\n", ":1: nested too deeply"),
    ('{"question": "who \\ud800", "answer": "a"}\n', ':1: field "question" holds an unpaired surrogate'),
    ('{"question": "q", "answer": "a", "perturbed_answer": ["  "]}\n', ':1: field "perturbed_answer" must be'),
])
def test_records_that_used_to_end_in_unexpected(content, fragment, llada_dir, tmp_path, no_weight_loads):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(content)
    before = snapshot(forget)
    result = run("unlearn", "--model", llada_dir, "--forget", forget, "--out", tmp_path / "o")
    assert_one_line_error(result, 1, f"{forget}{fragment}")
    assert snapshot(forget) == before


def test_broken_chat_template_is_named(llada_dir, forget_file, tmp_path, no_weight_loads):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }")
    before = snapshot(template, forget_file)
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--chat-template", template,
                 "--out", tmp_path / "o")
    assert_one_line_error(result, 1, "the chat template fails")
    assert snapshot(template, forget_file) == before


@pytest.mark.parametrize("flag, value, fragment", [
    ("--max-steps", 10**12, "--max-steps must be at most"),
    ("--epochs", 10**12, "--epochs must be at most"),
    ("--seed", 2**70, "--seed must be a whole number from 0"),
    ("--seed", -1, "--seed must be a whole number from 0"),
])
def test_numbers_that_would_hang_or_overflow_are_usage_errors(flag, value, fragment, llada_dir, forget_file, tmp_path,
                                                             no_weight_loads):
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", tmp_path / "o", flag, value)
    assert_one_line_error(result, 2, fragment)


def test_generation_with_absurd_steps_finishes(llada_dir):
    from mdu_cli.model.inference import load_for_inference
    from mdu_cli.model.sampling import generate

    loaded = load_for_inference(str(llada_dir))
    prompt = loaded.prompt_ids([{"role": "user", "content": "who wrote the book ?"}])
    few = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompt], max_new_tokens=8, steps=8,
                   block_length=4)
    many = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompt], max_new_tokens=8, steps=10**12,
                    block_length=4)
    assert many == few  # steps beyond one per position commit nothing more


def test_a_damaged_checkpoint_config_is_named(base_copy, forget_file, no_weight_loads):
    config = json.loads((base_copy / "config.json").read_text())
    config.update(architectures=5, model_type=["x"], auto_map=None)
    (base_copy / "config.json").write_text(json.dumps(config))
    before = snapshot(base_copy, forget_file)
    result = run("unlearn", "--model", base_copy, "--forget", forget_file, "--out", base_copy.parent / "o")
    assert_one_line_error(result, 1, "cannot tell the model family")
    assert snapshot(base_copy, forget_file) == before


def test_a_fifo_where_weights_should_be_is_named(tmp_path):
    base = _checkpoint(tmp_path / "base")
    other = tmp_path / "other"
    other.mkdir()
    os.mkfifo(other / "model.safetensors")
    result = run("diff", base, other)
    assert_one_line_error(result, 1, "not a regular file")


def test_push_of_a_hand_edited_run_record_is_named(hub, push_dir):
    record = json.loads((push_dir / "mdu_run.json").read_text())
    del record["config"]["kl"]
    (push_dir / "mdu_run.json").write_text(json.dumps(record))
    before = snapshot(push_dir)
    result = run("push", push_dir, "--repo-id", "me/x")
    assert_one_line_error(result, 1, "lacks a field the card needs")
    assert hub.requests == [] and snapshot(push_dir) == before


def test_a_lowered_cpu_kernel_level_that_breaks_bf16_attention_is_named(llada_dir, forget_file, tmp_path, monkeypatch):
    """torch 2.13's bf16 attention stops under ATEN_CPU_CAPABILITY=avx2 on an
    AVX-512-BF16 CPU ("pack_vnni2 is only supported when avx512 is supported"):
    the user's setting is named with the fix, never "unexpected"."""
    import mdu_cli.train.run

    def stops(*args, **kwargs):
        raise RuntimeError("pack_vnni2 is only supported when avx512 is supported")

    monkeypatch.setattr(mdu_cli.train.run, "run_unlearn", stops)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", tmp_path / "out", "--dtype", "bf16")
    assert_one_line_error(result, 1, "ATEN_CPU_CAPABILITY=avx2 lowers it; unset ATEN_CPU_CAPABILITY, or run with "
                                     "--dtype fp32")
    assert "unexpected" not in result.stderr


# ---- numbers that mislead instead of failing (issue 20, class 5) -----------------------------------------------

@pytest.mark.parametrize("option", ["--lora-alpha", "--lora-dropout", "--lr", "--tau", "--eta", "--alpha",
                                    "--weight-decay", "--warmup-ratio", "--max-grad-norm", "--npo-beta"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_must_be_finite(option, value, llada_dir, forget_file, retain_file, tmp_path,
                                           no_weight_loads):
    """nan compares false against every bound, so a range check alone lets it
    through to surface as a NaN loss blamed on --lr: each float option is a
    usage error first."""
    before = snapshot(forget_file, retain_file)
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--retain", retain_file, "--lora",
                 "--out", tmp_path / "out", option, value)
    assert_one_line_error(result, 2, option, "must be")
    assert snapshot(forget_file, retain_file) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["generate", "M", "--prompt", "hi", "--temperature", "nan"],
                                  ["push", "D", "--repo-id", "me/x", "--timeout", "nan"]])
def test_nan_is_no_value_for_a_range_option(args, tmp_path):
    result = run(*args)
    assert result.exit_code == 2 and "'nan' is not a finite number" in result.stderr


def test_diff_refuses_a_stale_single_file_beside_an_index(tmp_path):
    """transformers loads model.safetensors before it reads an index: a
    directory with both (the index not naming the single file) is refused,
    since reporting the shards would describe weights nobody loads."""
    from safetensors.torch import save_file

    base, other = tmp_path / "base", tmp_path / "other"
    for directory in (base, other):
        directory.mkdir()
    save_file({"w": torch.ones(4)}, base / "model.safetensors")
    save_file({"w": torch.zeros(4)}, other / "model.safetensors")
    save_file({"w": torch.full((4,), 2.0)}, other / "model-00001-of-00001.safetensors")
    (other / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    before = snapshot(tmp_path)
    result = run("diff", base, other)
    assert_one_line_error(result, 1, "holds both model.safetensors and model.safetensors.index.json",
                          "transformers loads model.safetensors")
    assert snapshot(tmp_path) == before


# ---- outputs the tool can read back (issue 20, class 8) ----------------------------------------------------------

def test_an_output_trained_with_a_chat_template_carries_it(masked_lm_dir, forget_file, tmp_path):
    """A base without a chat template, unlearned with --chat-template: the
    output holds the template, and `mdu eval` and `mdu generate` read it back
    and format prompts exactly as training did."""
    from tiny_models import BERT_CHAT_TEMPLATE

    from mdu_cli.data.tokenization import encode_prompt
    from mdu_cli.model.inference import load_for_inference

    base = tmp_path / "base"
    shutil.copytree(masked_lm_dir, base)
    for name in ("chat_template.jinja", "chat_template.json"):
        (base / name).unlink(missing_ok=True)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    template = tmp_path / "my-template.jinja"
    template.write_text(BERT_CHAT_TEMPLATE.replace("assistant:", "answer:"))
    result = run("eval", base, "--forget", forget_file, "--mc-samples", 2, "--max-new-tokens", 0)
    assert_one_line_error(result, 1, "has no chat template", "chat_template.jinja")
    out = tmp_path / "out"
    result = run("unlearn", "--model", base, "--forget", forget_file, "--chat-template", template, "--out", out,
                 "--max-steps", 1)
    assert result.exit_code == 0, result.stderr
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    messages = [{"role": "user", "content": "who wrote the book ?"}]
    loaded = load_for_inference(str(out))
    assert loaded.prompt_ids(messages) == encode_prompt(loaded.tokenizer, messages)
    assert loaded.tokenizer.convert_tokens_to_ids("answer") in loaded.prompt_ids(messages)
    result = run("eval", out, "--forget", forget_file, "--mc-samples", 2, "--max-new-tokens", 0, "--json")
    assert result.exit_code == 0, result.stderr
    result = run("generate", out, "--prompt", "who wrote the book ?", "--max-new-tokens", 2, "--steps", 2)
    assert result.exit_code == 0, result.stderr


# ---- failures named as what they are (issue 20, class 7) -------------------------------------------------------

@pytest.mark.parametrize("status, message", [
    (401, "the Hub refused the request (401"), (403, "the token has no access (403)"),
    (429, "the Hub is rate-limiting this machine (429)"), (501, "the Hub failed (501)"),
    ("portal", "answered with a web page, not the Hub's API (a captive portal"),
])
def test_a_refused_or_hijacked_download_is_named_as_such(status, message, hub, llada_dir, tmp_path):
    """401, 403, 429, a server error and a captive portal's web page are each
    said as what they are, not as "unreachable or offline"."""
    hub.datasets[("o/ok", "main")] = ("a" * 40, {"f.jsonl": b'{"question": "q", "answer": "a"}\n'})
    if status == "portal":
        hub.portal = True
    else:
        hub.file_status = status
    result = run("unlearn", "--model", llada_dir, "--forget", "hf://datasets/o/ok/f.jsonl", "--out", tmp_path / "o")
    assert_one_line_error(result, 1, "hf://datasets/o/ok/f.jsonl", message)
    assert "unreachable" not in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("error, message", [
    (OSError(28, "No space left on device", "/data/out/model.safetensors"), "no space left on the device"),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
     "no space left on the device"),
    (PermissionError(13, "Permission denied", "/runs/mdu-unlearn/events.out"),
     "cannot write /runs/mdu-unlearn/events.out (Permission denied)"),
    (OSError(30, "Read-only file system", "/ro/logs"), "cannot write /ro/logs (Read-only file system)"),
])
def test_the_machine_failing_mid_run_is_named_not_unexpected(error, message, llada_dir, forget_file, tmp_path,
                                                             monkeypatch):
    """A disk that fills while the output is written (OSError, or safetensors'
    own error), a logging folder that cannot be written: one line saying what
    happened and what to do, never "unexpected"."""
    import mdu_cli.train.run

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(mdu_cli.train.run, "run_unlearn", fails)
    result = run("unlearn", "--model", llada_dir, "--forget", forget_file, "--out", tmp_path / "o")
    assert_one_line_error(result, 1, message)
    assert "unexpected" not in result.stderr


def test_a_hub_cache_that_cannot_be_written_is_named(hub, llada_dir, tmp_path, monkeypatch):
    import huggingface_hub.file_download as file_download

    hub.datasets[("o/ok", "main")] = ("a" * 40, {"f.jsonl": b'{"question": "q", "answer": "a"}\n'})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", full)
    result = run("unlearn", "--model", llada_dir, "--forget", "hf://datasets/o/ok/f.jsonl", "--out", tmp_path / "o")
    assert_one_line_error(result, 1, "cannot write the download into the Hugging Face cache (No space left on device)")


def test_a_json_array_followed_by_garbage_is_one_error_at_its_line(tmp_path, llada_dir):
    data = tmp_path / "forget.json"
    data.write_text('[\n  {"question": "q", "answer": "a"},\n  {"question": "r", "answer": "b"}\n]\ngarbage\n')
    before = snapshot(data)
    result = run("unlearn", "--model", llada_dir, "--forget", data, "--out", tmp_path / "o")
    assert_one_line_error(result, 1, "forget.json:5: the JSON array is not valid JSON")
    assert snapshot(data) == before


def test_thousands_of_records_too_long_print_fifty_lines(llada_dir, tmp_path):
    """Too long for --max-length is found per record; like a file's bad JSON,
    at most 50 lines are printed and the rest counted."""
    data = write_jsonl(tmp_path / "forget.jsonl", [{"question": "who " * 80, "answer": "a ."}] * 2000)
    result = run("unlearn", "--model", llada_dir, "--forget", data, "--out", tmp_path / "o", "--max-length", 16)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 51 and "... and 1950 more records" in lines[-1]


def test_a_joint_run_that_draws_no_forget_row_is_refused_before_loading(llada_dir, tmp_path, no_weight_loads):
    forget = write_jsonl(tmp_path / "forget.jsonl", [{"question": "q", "answer": "a"}])
    retain = write_jsonl(tmp_path / "retain.jsonl", [{"question": f"q{i}", "answer": "b"} for i in range(200)])
    before = snapshot(tmp_path)
    result = run("unlearn", "--model", llada_dir, "--forget", forget, "--retain", retain, "--out", tmp_path / "o",
                 "--batch-accounting", "joint", "--max-steps", 1, "--batch-size", 1, "--grad-accum", 1)
    assert_one_line_error(result, 1, "--batch-accounting joint draws no forget row in the 1 steps")
    assert snapshot(tmp_path) == before


def test_mdu_hub_timeout_bounds_the_library_s_own_download_timeouts(monkeypatch):
    """huggingface_hub passes its own timeout (10 s) to downloads and metadata
    requests, which the session's fallback would not replace: MDU_HUB_TIMEOUT
    sets those too, as the docs say."""
    from huggingface_hub import constants

    from mdu_cli.io import hub_session

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 10)
    monkeypatch.setattr(hub_session, "_installed", None)
    monkeypatch.setenv("MDU_HUB_TIMEOUT", "3.5")
    assert hub_session.bound_hub_requests() == 3.5
    assert constants.HF_HUB_DOWNLOAD_TIMEOUT == constants.HF_HUB_ETAG_TIMEOUT == 3.5
    monkeypatch.setattr(hub_session, "_installed", None)


def test_a_run_writes_only_its_output_its_logs_and_the_cache(hub, llada_dir, tmp_path, monkeypatch):
    """The whole file tree around a run with Hub data, tracker logs and saved
    states: afterwards the only new things are the output and the logging
    directory (the state is gone with the run, and the lock too); the
    working directory, the inputs' folders and everything else are as they
    were, and downloads went to the cache alone."""
    hub.datasets[("o/ok", "main")] = ("b" * 40, {"f.jsonl": b'{"question": "who wrote it ?", "answer": "astrid ."}\n'})
    inputs, cwd = tmp_path / "inputs", tmp_path / "cwd"
    inputs.mkdir()
    cwd.mkdir()
    base = inputs / "base"
    shutil.copytree(llada_dir, base)
    retain = write_jsonl(inputs / "retain.jsonl", [{"question": "what is the capital of france ?", "answer": "paris ."}])
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    cache_before = {p for p in Path(hub.cache).rglob("*")}
    result = run("unlearn", "--model", base, "--forget", "hf://datasets/o/ok/f.jsonl", "--retain", retain,
                 "--out", tmp_path / "out", "--logging-dir", tmp_path / "logs", "--report-to", "tensorboard",
                 "--max-steps", 4, "--save-every", 2)
    assert result.exit_code == 0, result.stderr
    after = snapshot(tmp_path)
    new = {Path(p) for p in set(after) - set(before)}
    assert all(p.is_relative_to(tmp_path / "out") or p.is_relative_to(tmp_path / "logs") for p in new), sorted(new)
    assert {p: after[str(p)] for p in map(Path, before)} == {p: before[str(p)] for p in map(Path, before)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "inputs", "logs", "out"]
    assert not any(cwd.iterdir())
    assert {p for p in Path(hub.cache).rglob("*")} >= cache_before
    assert any(p.name == "f.jsonl" for p in Path(hub.cache).rglob("*")), "the data came through the cache"


@pytest.mark.parametrize("option, name", [("--json", "notes.json"), ("--md", "thesis.md"), ("--plot", "photo.png")])
def test_a_report_never_overwrites_a_file_mdu_did_not_write(option, name, llada_dir, tmp_path):
    """Writing a report over a file deletes what was in it: an existing file
    that is not a report mdu wrote is refused (and the user's bytes stay);
    the report mdu wrote itself is replaced when the command runs again."""
    from safetensors.torch import load_file

    other = tmp_path / "other"
    shutil.copytree(llada_dir, other)
    tensors = load_file(llada_dir / "model.safetensors")
    save_file({k: v + 1 for k, v in tensors.items()}, other / "model.safetensors")
    mine = tmp_path / name
    mine.write_bytes(b"\x89PNG\r\n\x1a\n my holiday" if name.endswith(".png") else b"mine, not a report\n")
    before = snapshot(tmp_path)
    result = run("diff", llada_dir, other, option, mine)
    assert_one_line_error(result, 1, f"{option} {mine} exists and is not a report mdu wrote")
    assert snapshot(tmp_path) == before
    report = tmp_path / f"report{mine.suffix}"
    for _ in range(2):  # the second run replaces the first run's report
        result = run("diff", llada_dir, other, option, report)
        assert result.exit_code == 0, result.stderr
    assert report.stat().st_size > 0
