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
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Optional

from mdu_cli.errors import MduError

if TYPE_CHECKING:
    import numpy as np

# Every dtype the safetensors format defines -> bits per element. Sub-byte
# floats (F4, F6_*) are packed, so sizes are counted in bits.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# Those a diff cannot widen to one float64 per element, with the reason in words.
UNSUPPORTED_DTYPES = {"C64": "complex numbers", "F4": "packed 4-bit floats", "F6_E2M3": "packed 6-bit floats",
                      "F6_E3M2": "packed 6-bit floats"}
# numpy is imported only when something is widened in Python: `mdu diff` with
# the native kernel never needs it, and its import is a tenth of a run.
NUMPY_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
                "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
                "U64": "uint64"}
# float8 kinds numpy lacks; torch has them (imported only for these).
TORCH_FLOAT8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
                "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}
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
        """Bytes per element (byte-sized dtypes only; see UNSUPPORTED_DTYPES)."""
        return DTYPE_BITS[self.dtype] // 8


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


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.:/\-]{1,200}")


def _label(name: str, index: int) -> str:
    """How an error names a tensor: its name when that is a plain one, else its
    position in the header. A header is bytes of the file, and messages do not
    echo arbitrary bytes of a file."""
    return f"tensor {name}" if _PLAIN_NAME.fullmatch(name) else f"header entry {index + 1}"


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey
    return dict(pairs)


class _DuplicateKey(ValueError):
    pass


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: 8-byte little-endian length, JSON.

    Checked as the format's reference reader checks it: every entry an object
    with a known dtype, a shape of whole numbers >= 0 and two whole data
    offsets whose span is exactly the tensor's size; the spans, in offset
    order, cover the data without gaps or overlaps up to the end of the file;
    no name twice.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the open, a device never end
            raise MduError(f"{path}: not a regular file; give a .safetensors file")
        size = info.st_size
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
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        raise _corrupt(path, "the header names a key twice") from None
    except RecursionError:
        raise _corrupt(path, "the header is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise _corrupt(path, "__metadata__ is not an object")

    data_start, data_size = 8 + header_len, size - 8 - header_len
    tensors, spans = {}, []
    for index, (name, entry) in enumerate(header.items()):
        if name == "__metadata__":
            continue
        label = _label(name, index)
        if not isinstance(entry, dict):
            raise _corrupt(path, f"{label} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise _corrupt(path, f"{label} has a dtype the safetensors format does not define")
        if not isinstance(shape, list) or not all(_whole(d) and d >= 0 for d in shape):
            raise _corrupt(path, f"{label} has a shape that is not a list of whole numbers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
            raise _corrupt(path, f"{label} has data_offsets that are not two whole numbers")
        begin, end = offsets
        numel = 1
        for dim in shape:
            numel *= dim
        bits = numel * DTYPE_BITS[dtype]
        if not 0 <= begin <= end or bits % 8 or end - begin != bits // 8:
            raise _corrupt(path, f"{label} has offsets that do not match its shape")
        if end > data_size:
            raise _corrupt(path, f"{label} ends past the end of the file ({data_start + end} > {size} bytes)")
        tensors[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + begin)
        spans.append((begin, end, label))
    position = 0
    for begin, end, label in sorted(spans):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise _corrupt(path, f"{label} {problem}")
        position = end
    if position != data_size:
        raise _corrupt(path, f"{data_size - position} bytes after the last tensor's data")
    return tensors


def is_hub_snapshot(directory: Path) -> bool:
    """A Hugging Face cache snapshot: its files are links into the repo's blobs/."""
    return directory.parent.name == "snapshots" and (directory.parent.parent / "blobs").is_dir()


def _inside(path: Path, directory: Path) -> bool:
    """Whether `path`, links followed, stays inside `directory` (for a cache
    snapshot: inside its repo folder, where the blobs are)."""
    from mdu_cli.io.output_location import is_within

    return is_within(path, directory.parent.parent if is_hub_snapshot(directory) else directory)


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
    if not _inside(path, directory):
        raise MduError(f"{index_path}: shard {shard!r} is a link that leads outside the checkpoint directory; "
                       "refusing to read it")
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
        except OSError as err:
            raise MduError(f"{index_path}: cannot read ({err.strerror})") from None
        except (ValueError, KeyError, TypeError, RecursionError):
            raise MduError(f"{index_path}: not a valid index (no weight_map object); "
                           "save the checkpoint again") from None
        single = directory / "model.safetensors"
        if (single.is_file() or single.is_symlink()) and single.name not in weight_map.values():
            # transformers loads model.safetensors first and never reads the index:
            # reporting the shards would describe weights nobody loads.
            raise MduError(f"{source}: holds both model.safetensors and {INDEX_NAME} (which does not name it); "
                           "transformers loads model.safetensors, so one of them is stale: remove it, then run again")
        headers = {}
        for name, shard in weight_map.items():
            path = _checked_shard(directory, index_path, shard)
            if path not in headers:
                headers[path] = read_header(path)
            if name not in headers[path]:
                raise MduError(f"{index_path}: {_label(name, 0) if _PLAIN_NAME.fullmatch(name) else 'a tensor'} is "
                               f"mapped to {shard!r}, which does not hold it; the index is stale")
            tensors[name] = headers[path][name]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
            raise MduError(f"{source}: no .safetensors weights{hint}")
        for path in files:
            if not _inside(path, directory):
                raise MduError(f"{path}: a link that leads outside the checkpoint directory; refusing to read it "
                               "(copy the file in instead)")
            for name, info in read_header(path).items():
                if name in tensors:
                    raise MduError(f"{source}: tensor {name} is stored in both {tensors[name].file.name} and "
                                   f"{path.name}, and there is no index to choose; add {INDEX_NAME}")
                tensors[name] = info
    return Checkpoint(source, directory, tensors, _read_config(directory))


def local_files(spec: str) -> list[Path]:
    """The files a diff of the local checkpoint `spec` may read (none for a Hub
    id), found without reading any: so that no report overwrites one."""
    local = Path(spec).expanduser()
    if local.is_file():
        return [local, local.parent / "config.json"]
    if local.is_dir():
        names = ("*.safetensors", INDEX_NAME, "config.json", "adapter_config.json")
        return [p for pattern in names for p in local.glob(pattern)]
    return []


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
    from mdu_cli.io.hub_session import looks_like_path, snapshot

    if looks_like_path(spec):
        raise MduError(f"{spec}: no such file or directory")
    directory = snapshot(spec, revision, HUB_PATTERNS)
    checkpoint = open_directory(directory, spec)
    checkpoint.revision = directory.name
    return checkpoint


def unsupported_dtype(info: TensorInfo) -> MduError:
    return MduError(f"{info.file}: {_label(info.name, 0)} is stored as {info.dtype} "
                    f"({UNSUPPORTED_DTYPES.get(info.dtype, 'an unsupported dtype')}), which mdu diff cannot compare "
                    "element by element; the safetensors file itself is fine")


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
        elif info.dtype in TORCH_FLOAT8:  # numpy has no such type, torch does (imported only here: it costs a second)
            import torch

            kind = getattr(torch, TORCH_FLOAT8[info.dtype], None)
            if kind is None:
                raise MduError(f"{info.file}: {_label(info.name, 0)} is stored as {info.dtype}, which this torch "
                               f"{torch.__version__} cannot read; upgrade torch to compare it")
            np.copyto(out, torch.frombuffer(raw, dtype=kind).to(torch.float64).numpy())
        else:
            raise unsupported_dtype(info)
        return out

    def close(self) -> None:
        for handle in self.handles.values():
            os.close(handle)
        self.handles.clear()
