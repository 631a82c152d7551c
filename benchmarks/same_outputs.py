"""Compare the outputs of benchmarks/same_outputs.sh for two source trees.

    python benchmarks/same_outputs.py OLD_WORK NEW_WORK OLD_TREE NEW_TREE

Tensors are compared by the sha256 of their bytes; JSON and JSONL documents
with wall times, peak memory and paths into the work or source trees taken
out; text files as text. Prints each file that differs; exit 1 if any does."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

# What honestly varies from one run to the next.
VARYING = {"elapsed_s", "wall_time_s", "peak_memory_bytes", "seconds", "created"}


def _scrub(value, roots: list[str]):
    if isinstance(value, dict):
        return {k: _scrub(v, roots) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [_scrub(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<root>")
        return value
    return value


def digest(work: Path, roots: list[str]) -> dict:
    out = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        name = str(path.relative_to(work))
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                out[name] = {k: hashlib.sha256(f.get_tensor(k).contiguous().view(-1).view(dtype=torch.uint8)
                                               .numpy().tobytes()).hexdigest() for k in f.keys()}
        elif path.suffix == ".jsonl":
            out[name] = [_scrub(json.loads(line), roots) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix in (".json", ".stdout", ".md", ".jinja", ".txt"):
            text = path.read_text()
            try:
                out[name] = _scrub(json.loads(text), roots)
            except ValueError:
                out[name] = _scrub(text, roots)
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main(old_work: str, new_work: str, old_tree: str, new_tree: str) -> int:
    old = digest(Path(old_work), [str(Path(old_work)) + "/", str(Path(old_tree)) + "/"])
    new = digest(Path(new_work), [str(Path(new_work)) + "/", str(Path(new_tree)) + "/"])
    differ = [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    print(f"{len(old)} files from the old tree, {len(new)} from the new; {len(differ)} differ")
    for name in differ:
        print(f"  differs: {name}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
