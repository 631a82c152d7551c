"""The parameter-delta report: how far each tensor, layer and module kind moved.

Tensors of the two checkpoints are joined by name (through each side's index,
never by file), read in chunks of CHUNK_ELEMENTS elements on a few threads,
and reduced to float64 sums from which every statistic is derived. The
reduction is one fused pass in the native kernel (mdu_cli/diff/_diffkernel.c), or
numpy where that did not build. Memory stays bounded whatever the model size:
each thread holds one chunk per side.

Schema (version 1) of the report dictionary, also written as JSON:
    schema_version  1
    base, other     {source, path, revision, tensors, files}
    tensors         one entry per tensor compared: name, shape, numel,
                    dtype_base, dtype_other, layer (int or null), module, and
                    the statistics below; tied tensors also carry tied_to
    layers          statistics per block index (the N of "...layers.N...")
    modules         statistics per module kind (MODULE_KINDS)
    total           statistics over every compared tensor
    top             the `top` tensors with the largest rel_l2: name, rel_l2
    only_in_base, only_in_other   name, shape, dtype
    shape_mismatch  name, shape_base, shape_other
    tied            name, side ("base" | "other"), tied_to
Statistics: l2 = ||other - base||, rel_l2 = l2 / ||base||, max_abs and
mean_abs of the difference, cosine between base and other, frac_changed =
fraction of elements not exactly equal, norm_base and norm_other. rel_l2
and cosine are null where a norm is zero. Aggregates use the summed squares, so layer and module rel_l2 is
the norm of the concatenated difference over the norm of the concatenated base.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from tqdm import tqdm

from mdu_cli.errors import MduError
from mdu_cli.io.safetensors_reader import (
    UNSUPPORTED_DTYPES,
    Checkpoint,
    ChunkReader,
    TensorInfo,
    read_header,
    unsupported_dtype,
)
from mdu_cli.model.block_names import BLOCK_LIST_PATTERN

if TYPE_CHECKING:
    import numpy as np

SCHEMA_VERSION = 1
# Elements per read: large enough that Python's per-chunk work is small beside
# the kernel's, small enough that a chunk of both sides stays in L2.
CHUNK_ELEMENTS = 1 << 17
MODULE_KINDS = ("embedding", "attention_q", "attention_k", "attention_v", "attention_qkv", "attention_out",
                "mlp", "norm", "head", "other")

_LAYER = re.compile(rf"(?:^|\.)(?:{BLOCK_LIST_PATTERN})\.(\d+)(?:\.|$)")
_EMBEDDING = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_positions", "wpe",
              "position_embeddings", "token_type_embeddings")
_HEAD_TAILS = ("lm_head.weight", "lm_head.bias", "decoder.weight", "decoder.bias", "transformer.ff_out.weight")
_ATTENTION = {
    "attention_q": ("q_proj", "query", "wq"),
    "attention_k": ("k_proj", "key", "wk"),
    "attention_v": ("v_proj", "value", "wv"),
    "attention_qkv": ("wqkv", "qkv_proj", "c_attn", "att_proj", "query_key_value"),
    "attention_out": ("o_proj", "attn_out", "out_proj", "dense_out"),
}
_MLP = ("mlp", "ff_proj", "up_proj", "gate_proj", "down_proj", "ff_out", "fc1", "fc2", "intermediate", "w1", "w2",
        "w3", "wi", "wo", "c_fc", "gate_up_proj")


def layer_of(name: str) -> Optional[int]:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    """The module kind of a parameter, from its name (LLaDA, Qwen/Dream, Llama,
    BERT and ModernBERT conventions)."""
    parts = name.lower().split(".")
    leaf = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
    if "norm" in leaf or leaf.startswith("ln") or "layernorm" in name.lower():
        return "norm"
    if any(part in _EMBEDDING for part in parts):
        return "embedding"
    if name.endswith(_HEAD_TAILS) and layer_of(name) is None or parts[0] in ("head", "cls") or "lm_head" in parts:
        return "head"
    in_attention = any(p in ("attn", "attention", "self_attn", "self_attention") for p in parts)
    for kind, leaves in _ATTENTION.items():
        if leaf in leaves:
            return kind
    if in_attention and leaf in ("wo", "dense", "c_proj"):
        return "attention_out"
    if leaf in _MLP or any(part in ("mlp", "feed_forward", "ffn", "intermediate") for part in parts):
        return "mlp"
    return "other"


@dataclass
class Sums:
    """Float64 sums over elements; merging two is adding them."""

    numel: int = 0
    sq_diff: float = 0.0
    sq_base: float = 0.0
    sq_other: float = 0.0
    abs_diff: float = 0.0
    max_abs: float = 0.0
    changed: int = 0

    def add(self, other: "Sums") -> "Sums":
        self.numel += other.numel
        self.sq_diff += other.sq_diff
        self.sq_base += other.sq_base
        self.sq_other += other.sq_other
        self.abs_diff += other.abs_diff
        if other.max_abs > self.max_abs or math.isnan(other.max_abs):  # a NaN stays: max() would drop it
            self.max_abs = other.max_abs
        self.changed += other.changed
        return self

    def stats(self) -> dict:
        l2 = math.sqrt(self.sq_diff)
        base_norm, other_norm = math.sqrt(self.sq_base), math.sqrt(self.sq_other)
        # <a, b> from the three squared norms, all float64: no fourth pass over the data.
        dot = (self.sq_base + self.sq_other - self.sq_diff) / 2
        cosine = dot / (base_norm * other_norm) if base_norm > 0 and other_norm > 0 else None
        return {
            "l2": l2,
            "rel_l2": l2 / base_norm if base_norm > 0 else None,
            "max_abs": self.max_abs,
            "mean_abs": self.abs_diff / self.numel if self.numel else 0.0,
            "cosine": min(1.0, max(-1.0, cosine)) if cosine is not None else None,
            "frac_changed": self.changed / self.numel if self.numel else 0.0,
            "norm_base": base_norm,
            "norm_other": other_norm,
        }


def _load_kernel():
    """The native kernel (mdu_cli/diff/_diffkernel.c) unless it did not build or
    MDU_DIFF_ENGINE=numpy asks for the numpy path."""
    choice = os.environ.get("MDU_DIFF_ENGINE", "auto")
    if choice not in ("auto", "native", "numpy"):
        raise MduError(f"MDU_DIFF_ENGINE={choice!r}: use auto, native or numpy")
    if choice == "numpy":
        return None
    try:
        kernel = importlib.import_module("mdu_cli.diff._diffkernel")
    except ImportError:
        if choice == "native":
            raise MduError("MDU_DIFF_ENGINE=native, but mdu_cli.diff._diffkernel is not built; reinstall mdu-cli "
                           "where a C compiler is available, or unset MDU_DIFF_ENGINE") from None
        return None
    return kernel


def engine() -> str:
    """Which inner loop `mdu diff` runs: "native" or "numpy"."""
    return "native" if _load_kernel() else "numpy"


def _native_kinds(kernel) -> dict[str, int]:
    return {"F64": kernel.F64, "F32": kernel.F32, "BF16": kernel.BF16, "F16": kernel.F16}


def _numpy_sums(base: np.ndarray, other: np.ndarray, scratch: np.ndarray) -> Sums:
    import numpy as np

    diff = scratch[: base.shape[0]]
    np.subtract(other, base, out=diff)
    sums = Sums(
        numel=int(base.shape[0]),
        sq_diff=float(np.dot(diff, diff)),
        sq_base=float(np.dot(base, base)),
        sq_other=float(np.dot(other, other)),
        changed=int(np.count_nonzero(np.not_equal(base, other))),
    )
    np.abs(diff, out=diff)
    sums.abs_diff = float(diff.sum())
    sums.max_abs = float(diff.max()) if diff.shape[0] else 0.0
    return sums


def chunk_sums(base: np.ndarray, other: np.ndarray, scratch: np.ndarray, kernel=None) -> Sums:
    """Sums of one chunk pair (float64 arrays of equal length); `scratch` is a
    float64 buffer at least as long, reused so that no chunk allocates."""
    if kernel is None:
        return _numpy_sums(base, other, scratch)
    return Sums(int(base.shape[0]), *kernel.sums(base, kernel.F64, other, kernel.F64, base.shape[0]))


class _Workers:
    """A few threads, each with its own buffers; preadv, the kernel and numpy's
    loops release the GIL, so chunks of one tensor are reduced in parallel."""

    def __init__(self, workers: int):
        self.kernel = _load_kernel()
        self.kinds = _native_kinds(self.kernel) if self.kernel else {}
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.workers = workers
        self.local = threading.local()
        self.readers: list[ChunkReader] = []
        self.lock = threading.Lock()

    def _buffers(self) -> tuple[ChunkReader, ChunkReader, np.ndarray]:
        if not hasattr(self.local, "buffers"):
            scratch = None
            if self.kernel is None:
                import numpy as np

                scratch = np.empty(CHUNK_ELEMENTS)
            buffers = (ChunkReader(CHUNK_ELEMENTS), ChunkReader(CHUNK_ELEMENTS), scratch)
            with self.lock:
                self.readers.extend(buffers[:2])
            self.local.buffers = buffers
        return self.local.buffers

    def _span(self, base: TensorInfo, other: TensorInfo, start: int, stop: int) -> Sums:
        base_reader, other_reader, scratch = self._buffers()
        total = Sums()
        kernel, kinds = self.kernel, self.kinds
        for begin in range(start, stop, CHUNK_ELEMENTS):
            count = min(CHUNK_ELEMENTS, stop - begin)
            if kernel is None:
                total.add(_numpy_sums(base_reader.read_float64(base, begin, count),
                                      other_reader.read_float64(other, begin, count), scratch))
                continue
            # The kernel widens what it is given itself: no float64 copy of the chunk.
            base_chunk, base_kind = base_reader.read_native(base, begin, count, kinds)
            other_chunk, other_kind = other_reader.read_native(other, begin, count, kinds)
            total.add(Sums(count, *kernel.sums(base_chunk, kinds[base_kind], other_chunk, kinds[other_kind], count)))
        return total

    def tensor_sums(self, base: TensorInfo, other: TensorInfo) -> Sums:
        numel = base.numel
        if numel == 0:
            return Sums()
        chunks = math.ceil(numel / CHUNK_ELEMENTS)
        spans = min(self.workers, chunks)
        bounds = [min(numel, (chunks * i // spans) * CHUNK_ELEMENTS) for i in range(spans + 1)]
        futures = [self.pool.submit(self._span, base, other, bounds[i], bounds[i + 1]) for i in range(spans)]
        total = Sums()
        for future in futures:
            total.add(future.result())
        return total

    def close(self) -> None:
        self.pool.shutdown()
        for reader in self.readers:
            reader.close()
def _tied_partner(name: str, own: Checkpoint, other: Checkpoint) -> Optional[str]:
    """For a head stored on one side only: the embedding of the same shape on
    the other side, which stored the tied pair once (safetensors keeps one copy
    of shared tensors)."""
    if module_of(name) != "head" or not name.endswith("weight"):
        return None
    shape = own.tensors[name].shape
    candidates = [n for n, info in other.tensors.items() if module_of(n) == "embedding" and info.shape == shape]
    return candidates[0] if candidates else None


def _describe(checkpoint: Checkpoint) -> dict:
    return {"source": checkpoint.source, "path": str(checkpoint.path), "revision": checkpoint.revision,
            "tensors": len(checkpoint.tensors), "files": len(checkpoint.files)}


def _info_entry(info: TensorInfo) -> dict:
    return {"name": info.name, "shape": list(info.shape), "dtype": info.dtype}


def compare(base: Checkpoint, other: Checkpoint, top: int = 20, show_progress: bool = True,
            workers: Optional[int] = None) -> dict:
    """Build the delta report of `other` against `base` (schema in the module docstring)."""
    pairs: list[tuple[str, TensorInfo, TensorInfo, Optional[str]]] = []
    only_in_base, only_in_other, shape_mismatch, tied = [], [], [], []
    for name, info in base.tensors.items():
        if name in other.tensors:
            if other.tensors[name].shape != info.shape:
                shape_mismatch.append({"name": name, "shape_base": list(info.shape),
                                       "shape_other": list(other.tensors[name].shape)})
            else:
                pairs.append((name, info, other.tensors[name], None))
            continue
        partner = _tied_partner(name, base, other)
        if partner:
            tied.append({"name": name, "side": "base", "tied_to": partner})
            pairs.append((name, info, other.tensors[partner], partner))
        else:
            only_in_base.append(_info_entry(info))
    for name, info in other.tensors.items():
        if name in base.tensors:
            continue
        partner = _tied_partner(name, other, base)
        if partner:
            tied.append({"name": name, "side": "other", "tied_to": partner})
            pairs.append((name, base.tensors[partner], info, partner))
        else:
            only_in_other.append(_info_entry(info))

    for _, base_info, other_info, _ in pairs:  # refuse before the first read, not halfway
        for info in (base_info, other_info):
            if info.dtype in UNSUPPORTED_DTYPES:
                raise unsupported_dtype(info)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    pool = _Workers(workers)
    tensors, layer_sums, module_sums, total = [], {}, {}, Sums()
    try:
        for name, base_info, other_info, partner in tqdm(pairs, desc="mdu diff", unit="tensor",
                                                         disable=not show_progress, dynamic_ncols=True):
            sums = pool.tensor_sums(base_info, other_info)
            layer, module = layer_of(name), module_of(name)
            entry = {"name": name, "shape": list(base_info.shape), "numel": base_info.numel,
                     "dtype_base": base_info.dtype, "dtype_other": other_info.dtype,
                     "layer": layer, "module": module, **sums.stats()}
            if partner:
                entry["tied_to"] = partner
            tensors.append(entry)
            total.add(sums)
            if layer is not None:
                layer_sums.setdefault(layer, Sums()).add(sums)
            module_sums.setdefault(module, Sums()).add(sums)
    finally:
        pool.close()

    def aggregate(key: str, value, sums: Sums) -> dict:
        return {key: value, "numel": sums.numel, **sums.stats()}

    ranked = sorted((t for t in tensors if t["rel_l2"] is not None), key=lambda t: t["rel_l2"], reverse=True)
    return {
        "schema_version": SCHEMA_VERSION,
        "base": _describe(base),
        "other": _describe(other),
        "tensors": tensors,
        "layers": [aggregate("layer", layer, layer_sums[layer]) for layer in sorted(layer_sums)],
        "modules": [aggregate("module", kind, module_sums[kind]) for kind in MODULE_KINDS if kind in module_sums],
        "total": aggregate("tensors", len(tensors), total),
        "top": [{"name": t["name"], "rel_l2": t["rel_l2"]} for t in ranked[:top]],
        "only_in_base": only_in_base,
        "only_in_other": only_in_other,
        "shape_mismatch": shape_mismatch,
        "tied": tied,
    }


def top_layers(report: dict, n: int = 3) -> list[dict]:
    """The n layers whose weights moved most, by relative L2."""
    layers = [layer for layer in report["layers"] if layer["rel_l2"] is not None]
    return sorted(layers, key=lambda layer: layer["rel_l2"], reverse=True)[:n]


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


def is_adapter_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def _adapter_modules(adapter_dir: Path) -> tuple[dict[str, dict[str, TensorInfo]], float]:
    """{module path: {"A": info, "B": info}} and the LoRA scale of an adapter directory."""
    config_path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError):
        raise MduError(f"{config_path}: not a LoRA adapter config (needs r and lora_alpha)") from None
    # Variants whose merged delta is not one scale x B @ A would be reported
    # wrong without a word: refused instead (peft's merge_and_unload, then
    # `mdu diff` of the merged model, measures them).
    unsupported = [key for key in ("use_dora", "rank_pattern", "alpha_pattern") if config.get(key)]
    if unsupported:
        raise MduError(f"{config_path}: {', '.join(unsupported)} is set, and mdu diff measures plain LoRA only; "
                       "merge the adapter (peft merge_and_unload) and diff the merged model")
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    modules: dict[str, dict[str, TensorInfo]] = {}
    for name, info in read_header(adapter_dir / ADAPTER_WEIGHTS).items():
        match = _LORA_NAME.match(name)
        if match:
            modules.setdefault(match["module"], {})[match["part"]] = info
    return modules, scale


def compare_adapter(base: Checkpoint, adapter_dir: Path, source: str, top: int = 20,
                    show_progress: bool = True) -> dict:
    """The effective delta scale * B @ A of each adapted module against its base
    weight, one block of rows at a time, without merging the model. Tensors the
    adapter does not touch are unchanged and counted in `unchanged`."""
    adapter_dir = Path(adapter_dir)
    modules, scale = _adapter_modules(adapter_dir)
    import numpy as np

    scratch, kernel = np.empty(CHUNK_ELEMENTS), _load_kernel()
    reader_a, reader_b, reader_w = ChunkReader(CHUNK_ELEMENTS), ChunkReader(CHUNK_ELEMENTS), ChunkReader(CHUNK_ELEMENTS)
    tensors, only_in_other, layer_sums, module_sums, total = [], [], {}, {}, Sums()
    try:
        for module in tqdm(sorted(modules), desc="mdu diff", unit="module", disable=not show_progress,
                           dynamic_ncols=True):
            name, parts = f"{module}.weight", modules[module]
            weight = base.tensors.get(name)
            if weight is None or set(parts) != {"A", "B"} or len(weight.shape) != 2:
                only_in_other.append({"name": name, "shape": None, "dtype": "lora"})
                continue
            rows, cols = weight.shape
            rank = parts["A"].shape[0]
            lora_a = reader_a.read_float64(parts["A"], 0, rank * cols).reshape(rank, cols).copy()
            lora_b = reader_b.read_float64(parts["B"], 0, rows * rank).reshape(rows, rank).copy() * scale
            sums = Sums()
            step = max(1, CHUNK_ELEMENTS // cols)
            for first in range(0, rows, step):
                count = min(step, rows - first)
                block = reader_w.read_float64(weight, first * cols, count * cols)
                moved = block + (lora_b[first:first + count] @ lora_a).ravel()
                sums.add(chunk_sums(block, moved, scratch, kernel))
            layer, kind = layer_of(name), module_of(name)
            tensors.append({"name": name, "shape": list(weight.shape), "numel": weight.numel,
                            "dtype_base": weight.dtype, "dtype_other": "lora", "layer": layer, "module": kind,
                            "lora_rank": rank, **sums.stats()})
            total.add(sums)
            if layer is not None:
                layer_sums.setdefault(layer, Sums()).add(sums)
            module_sums.setdefault(kind, Sums()).add(sums)
    finally:
        for reader in (reader_a, reader_b, reader_w):
            reader.close()
    ranked = sorted((t for t in tensors if t["rel_l2"] is not None), key=lambda t: t["rel_l2"], reverse=True)
    adapted = {t["name"] for t in tensors}
    return {
        "schema_version": SCHEMA_VERSION,
        "base": _describe(base),
        "other": {"source": source, "path": str(adapter_dir), "revision": None, "tensors": len(tensors),
                  "files": 1, "adapter": {"scale": scale, "modules": len(modules)}},
        "tensors": tensors,
        "layers": [{"layer": k, "numel": v.numel, **v.stats()} for k, v in sorted(layer_sums.items())],
        "modules": [{"module": k, "numel": module_sums[k].numel, **module_sums[k].stats()}
                    for k in MODULE_KINDS if k in module_sums],
        "total": {"tensors": len(tensors), "numel": total.numel, **total.stats()},
        "top": [{"name": t["name"], "rel_l2": t["rel_l2"]} for t in ranked[:top]],
        "only_in_base": [],
        "only_in_other": only_in_other,
        "shape_mismatch": [],
        "tied": [],
        "unchanged": len([n for n in base.tensors if n not in adapted]),
    }


def check_report_outputs(base: str, other: str, outputs: dict[str, Optional[Path]]) -> None:
    """Before reading anything: no report file may be a file the diff reads
    (compared as resolved paths, so links and ../ do not slip by), two
    reports may not share a file, and each must be writable."""
    from mdu_cli.io.output_location import check_report_file
    from mdu_cli.io.safetensors_reader import local_files

    read = local_files(base) + local_files(other)
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        check_report_file(Path(path), option, read)
        resolved = Path(path).resolve()
        if resolved in seen:
            raise MduError(f"{option} and {seen[resolved]} name the same file {path}; give each its own")
        seen[resolved] = option


def diff(base: str, other: str, revision_base: Optional[str] = None, revision_other: Optional[str] = None,
         top: int = 20, show_progress: bool = True) -> dict:
    """`mdu diff` as a library call: open both sides, compare, return the report."""
    from mdu_cli.config.hub_names import check_revision
    from mdu_cli.io.safetensors_reader import open_checkpoint

    check_revision(revision_base, "--revision-base")
    check_revision(revision_other, "--revision-other")
    if is_adapter_dir(other):
        return compare_adapter(open_checkpoint(base, revision_base), Path(other), other, top=top,
                               show_progress=show_progress)
    return compare(open_checkpoint(base, revision_base), open_checkpoint(other, revision_other),
                   top=top, show_progress=show_progress)
