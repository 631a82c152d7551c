"""`mdu diff` and the delta report against independent float64 computations.

References are computed from whole tensors loaded with the safetensors
library (not mdu's chunked reader) and numpy in float64.
"""

import json
import math
import re
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mdu_cli.cli import cli
from mdu_cli.diff import report as delta_report
from mdu_cli.diff.report import CHUNK_ELEMENTS, compare, layer_of, module_of
from mdu_cli.errors import MduError
from mdu_cli.io.safetensors_reader import open_checkpoint

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics

GEN = torch.Generator().manual_seed(0)


def _tensors():
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=GEN),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=GEN),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(16, generator=GEN),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 48, generator=GEN),
        "model.layers.1.self_attn.o_proj.weight": torch.randn(16, 16, generator=GEN),
        # Several chunks, split across threads: exercises the span arithmetic.
        "model.layers.1.mlp.up_proj.weight": torch.randn(5, CHUNK_ELEMENTS + 7, generator=GEN),
        "model.norm.weight": torch.ones(16),
        "lm_head.weight": torch.randn(64, 16, generator=GEN),
    }


def _perturbed(tensors):
    out = {}
    for i, (name, t) in enumerate(tensors.items()):
        delta = torch.zeros_like(t)
        if i % 3 != 1:
            flat = delta.view(-1)
            flat[:: (i + 2)] = torch.randn(flat[:: (i + 2)].shape, generator=GEN) * 10 ** -(i % 4 + 1)
        out[name] = t + delta
    return out


def _save(directory, tensors, shards=1):
    """Save as one file, or as `shards` files with an index (names spread round-robin)."""
    directory.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _reference(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = b - a
    na, nb = np.sqrt(np.sum(a * a)), np.sqrt(np.sum(b * b))
    return {
        "l2": float(np.sqrt(np.sum(d * d))),
        "rel_l2": float(np.sqrt(np.sum(d * d)) / na),
        "max_abs": float(np.max(np.abs(d))),
        "mean_abs": float(np.mean(np.abs(d))),
        "cosine": float(np.sum(a * b) / (na * nb)),
        "frac_changed": float(np.mean(a != b)),
    }


@pytest.fixture(params=["native", "numpy"])
def engine(request, monkeypatch):
    """Runs a test on both inner loops: the C kernel and the numpy fallback."""
    monkeypatch.setenv("MDU_DIFF_ENGINE", request.param)
    assert delta_report.engine() == request.param
    return request.param


def _assert_stats(entry, ref):
    for key, value in ref.items():
        assert entry[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_known_deltas_against_float64_reference(tmp_path, engine):
    base = _tensors()
    other = _perturbed(base)
    report = compare(open_checkpoint(str(_save(tmp_path / "a", base))),
                     open_checkpoint(str(_save(tmp_path / "b", other))), show_progress=False)
    by_name = {t["name"]: t for t in report["tensors"]}
    assert set(by_name) == set(base)
    for name in base:
        _assert_stats(by_name[name], _reference(base[name].numpy(), other[name].numpy()))
    everything = _reference(np.concatenate([base[n].numpy().ravel() for n in base]),
                            np.concatenate([other[n].numpy().ravel() for n in base]))
    _assert_stats(report["total"], everything)
    layer1 = [n for n in base if ".layers.1." in n]
    [entry] = [x for x in report["layers"] if x["layer"] == 1]
    _assert_stats(entry, _reference(np.concatenate([base[n].numpy().ravel() for n in layer1]),
                                    np.concatenate([other[n].numpy().ravel() for n in layer1])))
    assert report["top"][0]["rel_l2"] == max(t["rel_l2"] for t in report["tensors"])
    assert report["schema_version"] == 1


def test_differently_sharded_pair_and_bf16_against_fp32(tmp_path, engine):
    base = _tensors()
    other = {n: t.to(torch.bfloat16) for n, t in _perturbed(base).items()}
    report = compare(open_checkpoint(str(_save(tmp_path / "a", base, shards=1))),
                     open_checkpoint(str(_save(tmp_path / "b", other, shards=3))), show_progress=False)
    assert report["other"]["files"] == 3
    for entry in report["tensors"]:
        assert entry["dtype_base"] == "F32" and entry["dtype_other"] == "BF16"
        ref = _reference(base[entry["name"]].numpy(), other[entry["name"]].float().numpy())
        _assert_stats(entry, ref)


def test_identical_checkpoints_give_zeros(tmp_path, engine):
    base = _tensors()
    a, b = _save(tmp_path / "a", base), _save(tmp_path / "b", base, shards=2)
    report = compare(open_checkpoint(str(a)), open_checkpoint(str(b)), show_progress=False)
    for entry in report["tensors"] + report["layers"] + report["modules"] + [report["total"]]:
        assert entry["l2"] == 0 and entry["max_abs"] == 0 and entry["mean_abs"] == 0
        assert entry["frac_changed"] == 0 and entry["rel_l2"] == 0 and entry["cosine"] == pytest.approx(1.0)


def test_one_side_only_shape_mismatch_and_tied(tmp_path):
    base = _tensors()
    other = dict(base)
    del other["model.layers.0.mlp.down_proj.weight"]
    other["model.layers.2.extra.weight"] = torch.ones(3)
    other["model.layers.1.self_attn.o_proj.weight"] = torch.ones(8, 32)
    # The base was saved with its head tied to the embedding (stored once).
    tied_base = {n: t for n, t in base.items() if n != "lm_head.weight"}
    other["lm_head.weight"] = base["model.embed_tokens.weight"] + 0.5
    report = compare(open_checkpoint(str(_save(tmp_path / "a", tied_base))),
                     open_checkpoint(str(_save(tmp_path / "b", other))), show_progress=False)
    assert [e["name"] for e in report["only_in_base"]] == ["model.layers.0.mlp.down_proj.weight"]
    assert [e["name"] for e in report["only_in_other"]] == ["model.layers.2.extra.weight"]
    assert report["shape_mismatch"] == [{"name": "model.layers.1.self_attn.o_proj.weight",
                                         "shape_base": [16, 16], "shape_other": [8, 32]}]
    assert report["tied"] == [{"name": "lm_head.weight", "side": "other", "tied_to": "model.embed_tokens.weight"}]
    [head] = [t for t in report["tensors"] if t["name"] == "lm_head.weight"]
    assert head["max_abs"] == pytest.approx(0.5) and head["tied_to"] == "model.embed_tokens.weight"


def test_module_and_layer_names():
    cases = {
        "model.transformer.blocks.3.q_proj.weight": ("attention_q", 3),
        "model.transformer.blocks.3.attn_out.weight": ("attention_out", 3),
        "model.transformer.blocks.3.ff_out.weight": ("mlp", 3),
        "model.transformer.ff_out.weight": ("head", None),
        "model.transformer.wte.weight": ("embedding", None),
        "model.transformer.blocks.3.attn_norm.weight": ("norm", 3),
        "model.layers.12.self_attn.k_proj.bias": ("attention_k", 12),
        "model.layers.12.mlp.gate_proj.weight": ("mlp", 12),
        "model.layers.12.input_layernorm.weight": ("norm", 12),
        "lm_head.weight": ("head", None),
        "model.layers.1.attn.Wqkv.weight": ("attention_qkv", 1),
        "model.layers.1.attn.Wo.weight": ("attention_out", 1),
        "model.layers.1.mlp.Wo.weight": ("mlp", 1),
        "decoder.weight": ("head", None),
        "bert.encoder.layer.4.attention.self.value.weight": ("attention_v", 4),
        "model.something.odd": ("other", None),
    }
    for name, (module, layer) in cases.items():
        assert (module_of(name), layer_of(name)) == (module, layer), name


def test_truncated_and_garbage_files_are_named(tmp_path):
    directory = _save(tmp_path / "a", _tensors())
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(MduError, match=r"model.safetensors: not a valid safetensors file .*end of the file"):
        open_checkpoint(str(directory))
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 50)
    with pytest.raises(MduError, match="header is not valid JSON"):
        open_checkpoint(str(directory))
    path.write_bytes(b"\x01\x02")
    with pytest.raises(MduError, match="shorter than the 8-byte header"):
        open_checkpoint(str(directory))


def _handmade(header: dict, data: bytes, extra: bytes = b"") -> bytes:
    """A safetensors file byte by byte: length, JSON header, data, and whatever follows."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data + extra


_F32 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
_GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}


@pytest.mark.parametrize("header, data, problem", [
    (_GOOD, _F32 + b"\0", "1 bytes after the last tensor's data"),
    (_GOOD, _F32 + b"\0" * 8, "8 bytes after the last tensor's data"),
    ({"a": _GOOD["a"], "b": {**_GOOD["b"], "data_offsets": [12, 20]}}, _F32 + b"\0" * 4, "leaves a gap before it"),
    ({"a": {**_GOOD["a"], "shape": [3], "data_offsets": [0, 12]}, "b": _GOOD["b"]}, _F32, "overlaps"),
    ({"a": {**_GOOD["a"], "data_offsets": [0, 12]}, "b": _GOOD["b"]}, _F32, "do not match its shape"),
    ({"a": {**_GOOD["a"], "dtype": "F31"}, "b": _GOOD["b"]}, _F32, "dtype the safetensors format does not define"),
    ({"a": {**_GOOD["a"], "shape": [-2]}, "b": _GOOD["b"]}, _F32, "not a list of whole numbers >= 0"),
    ({"a": {**_GOOD["a"], "shape": [2.0]}, "b": _GOOD["b"]}, _F32, "not a list of whole numbers >= 0"),
    ({"a": {**_GOOD["a"], "data_offsets": [0, True]}, "b": _GOOD["b"]}, _F32, "not two whole numbers"),
    ({"a": _GOOD["a"], "b": {**_GOOD["b"], "shape": [4], "data_offsets": [8, 24]}}, _F32,
     "ends past the end of the file"),
    ({"__metadata__": ["x"], **_GOOD}, _F32, "__metadata__ is not an object"),
    ({"a": "F32", "b": _GOOD["b"]}, _F32, "is not an object"),
], ids=["trailing-byte", "trailing-tensor", "gap", "overlap", "span", "dtype", "negative-shape", "float-shape",
        "bool-offset", "past-the-end", "metadata", "entry"])
def test_every_header_defect_is_named_and_the_cli_exits_1(tmp_path, header, data, problem):
    """The safetensors checks, each on a file made by hand: trailing bytes after
    the last tensor (one byte or a whole tensor's worth), gaps, overlaps, spans
    that do not match the shape, unknown dtypes, bad shapes and offsets, data
    past the end; read by the reader and through `mdu diff`, which exits 1 with
    one line and leaves the file as it was."""
    good = tmp_path / "good.safetensors"
    good.write_bytes(_handmade(_GOOD, _F32))
    assert set(open_checkpoint(str(good)).tensors) == {"a", "b"}, "the hand-made format is the real one"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_handmade(header, data))
    before = bad.read_bytes()
    with pytest.raises(MduError, match=re.escape(problem)):
        open_checkpoint(str(bad))
    result = CliRunner().invoke(cli, ["diff", str(good), str(bad)])
    assert result.exit_code == 1 and problem in result.stderr and "bad.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert bad.read_bytes() == before


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_traversal_is_refused(tmp_path, shard):
    directory = _save(tmp_path / "a", _tensors(), shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = shard
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MduError, match="outside the checkpoint directory"):
        open_checkpoint(str(directory))


def test_index_naming_a_missing_shard(tmp_path):
    directory = _save(tmp_path / "a", _tensors(), shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MduError, match="is missing"):
        open_checkpoint(str(directory))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "pytorch_model.bin").write_bytes(b"anything")
    with pytest.raises(MduError, match="pickled weights are never loaded"):
        open_checkpoint(str(directory))


def test_cli_table_json_md_and_plot(tmp_path):
    base = _tensors()
    a, b = _save(tmp_path / "a", base), _save(tmp_path / "b", _perturbed(base), shards=2)
    result = CliRunner().invoke(cli, ["diff", str(a), str(b), "--json", str(tmp_path / "r.json"),
                                      "--md", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"), "--top", "3"])
    assert result.exit_code == 0, result.stderr
    assert "per layer" in result.stdout and "per module kind" in result.stdout and "top 3 tensors" in result.stdout
    assert "mdu diff" in result.stderr  # the progress bar
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"schema_version", "tensors", "layers", "modules", "total", "only_in_base", "only_in_other",
            "shape_mismatch"} <= set(report)
    assert (tmp_path / "r.md").read_text().startswith("## Parameter delta")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_single_file_sides(tmp_path):
    base = _tensors()
    a, b = _save(tmp_path / "a", base), _save(tmp_path / "b", _perturbed(base))
    result = CliRunner().invoke(cli, ["diff", str(a / "model.safetensors"), str(b / "model.safetensors"), "-q",
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads((tmp_path / "r.json").read_text())["total"]["tensors"] == len(base)


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    a = _save(tmp_path / "a", _tensors())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    result = CliRunner().invoke(cli, ["diff", str(a), str(a), "-q", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: --plot needs matplotlib; install it with: pip install 'mdu-cli[plot]'"


def test_cli_errors(tmp_path):
    result = CliRunner().invoke(cli, ["diff", str(tmp_path / "nope"), str(tmp_path / "nope2")])
    assert result.exit_code == 1 and "no such file or directory" in result.stderr and "Traceback" not in result.stderr
    result = CliRunner().invoke(cli, ["diff", "only-one-arg"])
    assert result.exit_code == 2


def test_hub_sides_with_revisions(tmp_path, hf_home):
    base = _tensors()
    for commit, tensors in (("a" * 40, base), ("b" * 40, _perturbed(base))):
        repo = hf_home / "hub" / "models--someone--diffme"
        _save(repo / "snapshots" / commit, tensors)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("b" * 40)
    report = delta_report.diff("someone/diffme", "someone/diffme", revision_base="a" * 40, show_progress=False)
    assert report["base"]["revision"] == "a" * 40 and report["other"]["revision"] == "b" * 40
    assert report["total"]["l2"] > 0


def test_unlearn_report_agrees_with_diff(llada_dir, forget_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file),
                                      "--out", str(out), "--max-steps", "2", "--lr", "1e-3"])
    assert result.exit_code == 0, result.stderr
    assert "Layers that moved most" in result.stdout
    written = json.loads((out / "delta_report.json").read_text())
    fresh = delta_report.diff(str(llada_dir), str(out), show_progress=False)
    assert written["other"]["path"] == str(out)
    assert written["tensors"] == fresh["tensors"] and written["total"] == fresh["total"]
    # The trained weights really differ from the base, tensor by tensor, as the reference says.
    base_weights, new_weights = load_file(llada_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for entry in written["tensors"]:
        ref = _reference(base_weights[entry["name"]].numpy(), new_weights[entry["name"]].numpy())
        _assert_stats(entry, ref)
    record = json.loads((out / "mdu_run.json").read_text())
    assert record["delta"]["rel_l2"] == pytest.approx(written["total"]["rel_l2"])
    assert (out / "delta_report.md").read_text().startswith("## Parameter delta")
    assert not math.isnan(written["total"]["cosine"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.int32, torch.float64, torch.bfloat16])
def test_every_storage_dtype_is_widened_exactly(tmp_path, engine, dtype):
    base = {"w": (torch.randn(300, 7, generator=GEN) * 4).to(dtype)}
    other = {"w": (base["w"].to(torch.float64) + (torch.arange(2100).view(300, 7) % 3 == 0)).to(dtype)}
    report = compare(open_checkpoint(str(_save(tmp_path / "a", base))),
                     open_checkpoint(str(_save(tmp_path / "b", other))), show_progress=False)
    a = load_file(tmp_path / "a" / "model.safetensors")["w"].to(torch.float64).numpy()
    b = load_file(tmp_path / "b" / "model.safetensors")["w"].to(torch.float64).numpy()
    _assert_stats(report["tensors"][0], _reference(a, b))


def test_module_kind_aggregates_against_float64_reference(tmp_path, engine):
    """Each module kind's statistics over the concatenation of its tensors (the
    model card prints these), and every layer's likewise."""
    base = _tensors()
    other = _perturbed(base)
    report = compare(open_checkpoint(str(_save(tmp_path / "a", base))),
                     open_checkpoint(str(_save(tmp_path / "b", other))), show_progress=False)
    kinds = {"model.embed_tokens.weight": "embedding", "model.layers.0.self_attn.q_proj.weight": "attention_q",
             "model.layers.0.self_attn.q_proj.bias": "attention_q", "model.layers.0.mlp.down_proj.weight": "mlp",
             "model.layers.1.self_attn.o_proj.weight": "attention_out", "model.layers.1.mlp.up_proj.weight": "mlp",
             "model.norm.weight": "norm", "lm_head.weight": "head"}
    modules = {entry["module"]: entry for entry in report["modules"]}
    assert set(modules) == set(kinds.values())
    for kind in set(kinds.values()):
        names = [n for n, k in kinds.items() if k == kind]
        want = _reference(np.concatenate([base[n].numpy().ravel() for n in names]),
                          np.concatenate([other[n].numpy().ravel() for n in names]))
        _assert_stats(modules[kind], want)
        assert modules[kind]["numel"] == sum(base[n].numel() for n in names)
    for layer in (0, 1):
        names = [n for n in base if f".layers.{layer}." in n]
        [entry] = [x for x in report["layers"] if x["layer"] == layer]
        _assert_stats(entry, _reference(np.concatenate([base[n].numpy().ravel() for n in names]),
                                        np.concatenate([other[n].numpy().ravel() for n in names])))
    from mdu_cli.hub.card import _delta_section

    card = "\n".join(_delta_section(report))
    for kind, entry in modules.items():
        assert f"| {kind} | {entry['rel_l2']:.3e} |" in card
