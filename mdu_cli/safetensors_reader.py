"""Reading safetensors checkpoints a slice at a time, safely.

The header is parsed here rather than through the safetensors library so that
tensor data can be read in bounded chunks with plain `preadv` calls: a memory
map would keep every page it touched resident, and a 16 GB checkpoint would
then show 16 GB of RSS. Every offset is checked against the file before use,
and shard lists from an index are checked against path traversal. Nothing
here ever unpickles.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Optional

from mdu_cli.errors import MduError

if TYPE_CHECKING:
    import numpy as np

# safetensors dtype name -> bytes per element
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}
# numpy is imported only when something is widened in Python: `mdu diff` with
# the native kernel never needs it, and its import is a tenth of a run.
NUMPY_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
                "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]


@dataclass
class Checkpoint:
    """Where every tensor of a checkpoint lives."""

    source: str                       # as the user named it
    path: Path                        # file or directory read
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)
    revision: Optional[str] = None    # resolved commit for a Hub checkpoint

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})


def _corrupt(path: Path, problem: str) -> MduError:
    return MduError(f"{path}: not a valid safetensors file ({problem}); the file may be truncated or corrupt, "
                    "download or save it again")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: 8-byte little-endian length, JSON."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise _corrupt(path, f"header length {header_len} does not fit in {size} bytes")
            raw = handle.read(header_len)
    except OSError as err:
        raise MduError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")

    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"tensor {name!r} has a malformed entry") from None
        if dtype not in DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(name, path, dtype, shape, data_start + int(begin))
        if not 0 <= begin <= end or end - begin != info.numel * info.itemsize:
            raise _corrupt(path, f"tensor {name!r} has offsets that do not match its shape")
        if data_start + end > size:
            raise _corrupt(path, f"tensor {name!r} ends past the end of the file ({data_start + end} > {size} bytes)")
        tensors[name] = info
    return tensors


def _checked_shard(directory: Path, index_path: Path, shard) -> Path:
    """A shard named by an index must be a plain file name inside the checkpoint."""
    if not isinstance(shard, str) or not shard:
        raise MduError(f"{index_path}: weight_map holds a non-string shard name {shard!r}; the index is corrupt")
    pure = PurePosixPath(shard)
    if pure.is_absolute() or ".." in pure.parts or "\\" in shard or Path(shard).is_absolute():
        raise MduError(f"{index_path}: shard {shard!r} points outside the checkpoint directory; refusing to read it")
    path = directory / pure
    if not path.is_file():
        raise MduError(f"{index_path}: shard {shard!r} is missing from {directory}")
    return path


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def open_directory(directory: Path, source: str) -> Checkpoint:
    index_path = directory / INDEX_NAME
    tensors: dict[str, TensorInfo] = {}
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise MduError(f"{index_path}: not a valid index (no weight_map object); save the checkpoint again") from None
        headers = {}
        for name, shard in weight_map.items():
            path = _checked_shard(directory, index_path, shard)
            if path not in headers:
                headers[path] = read_header(path)
            if name not in headers[path]:
                raise MduError(f"{index_path}: {name} is mapped to {shard}, which does not hold it; the index is stale")
            tensors[name] = headers[path][name]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
            raise MduError(f"{source}: no .safetensors weights{hint}")
        for path in files:
            for name, info in read_header(path).items():
                if name in tensors:
                    raise MduError(f"{source}: tensor {name} is stored in both {tensors[name].file.name} and "
                                   f"{path.name}, and there is no index to choose; add {INDEX_NAME}")
                tensors[name] = info
    return Checkpoint(source, directory, tensors, _read_config(directory))


def open_checkpoint(spec: str, revision: Optional[str] = None) -> Checkpoint:
    """A local directory, a single .safetensors file, or a Hub model id."""
    local = Path(spec).expanduser()
    if local.is_file():
        if local.suffix != ".safetensors":
            raise MduError(f"{spec}: not a .safetensors file; give a checkpoint directory, a .safetensors file "
                           "or a Hub model id")
        return Checkpoint(spec, local, read_header(local), _read_config(local.parent))
    if local.is_dir():
        return open_directory(local, spec)
    from mdu_cli.loading import looks_like_path, snapshot

    if looks_like_path(spec):
        raise MduError(f"{spec}: no such file or directory")
    directory = snapshot(spec, revision, HUB_PATTERNS)
    checkpoint = open_directory(directory, spec)
    checkpoint.revision = directory.name
    return checkpoint


class ChunkReader:
    """Reads element ranges of tensors into reusable buffers (one reader per
    thread) and widens them to float64."""

    def __init__(self, max_elements: int):
        self.max_elements = max_elements
        self.raw = bytearray(max_elements * 8)
        self.wide = self.scratch = None  # float64 and uint32 buffers, made on first use
        self.handles: dict[Path, int] = {}

    def _read_bytes(self, info: TensorInfo, start: int, count: int) -> memoryview:
        nbytes = count * info.itemsize
        if info.file not in self.handles:
            self.handles[info.file] = os.open(info.file, os.O_RDONLY)
        view = memoryview(self.raw)[:nbytes]
        if os.preadv(self.handles[info.file], [view], info.offset + start * info.itemsize) != nbytes:
            raise _corrupt(info.file, f"tensor {info.name} is cut short")
        return view

    def read_native(self, info: TensorInfo, start: int, count: int, kinds: dict[str, int]) -> tuple[object, str]:
        """Elements [start, start + count) as stored, when their dtype is one of
        `kinds` (the native kernel's), else widened to float64; returns the
        buffer and its dtype name."""
        if info.dtype in kinds:
            return self._read_bytes(info, start, count), info.dtype
        return self.read_float64(info, start, count), "F64"

    def read_float64(self, info: TensorInfo, start: int, count: int) -> np.ndarray:
        """Elements [start, start + count) of the flattened tensor as float64, in
        this reader's buffer (valid until its next read)."""
        import numpy as np

        raw = self._read_bytes(info, start, count)
        if self.wide is None:
            self.wide = np.empty(self.max_elements, dtype=np.float64)
            self.scratch = np.empty(self.max_elements, dtype=np.uint32)
        out = self.wide[:count]
        if info.dtype == "BF16":
            # bf16 is the top half of an fp32: widen the bits, then the value.
            bits = self.scratch[:count]
            np.copyto(bits, np.frombuffer(raw, dtype=np.uint16))
            np.left_shift(bits, 16, out=bits)
            np.copyto(out, bits.view(np.float32))
        elif info.dtype in NUMPY_DTYPES:
            np.copyto(out, np.frombuffer(raw, dtype=NUMPY_DTYPES[info.dtype]))
        else:  # float8: numpy has no such type, torch does (imported only here: it costs a second)
            import torch

            kind = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[info.dtype]
            np.copyto(out, torch.frombuffer(raw, dtype=kind).to(torch.float64).numpy())
        return out

    def close(self) -> None:
        for handle in self.handles.values():
            os.close(handle)
        self.handles.clear()
