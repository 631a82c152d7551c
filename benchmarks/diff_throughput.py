"""Throughput and peak memory of `mdu diff` against a raw read of the same files.

Builds a pair of fp32 checkpoints of about 1.5 GB each, sharded differently
on the two sides, reads them once with `cat` to warm the page cache, then in
the same run times `cat BASE OTHER > /dev/null`, `mdu diff BASE OTHER`, and the
same diff on its numpy fallback, and reads the diff's peak RSS (VmHWM of its
own process). Targets: wall time <= 2x
the raw read; peak RSS <= 3x the largest tensor + 300 MB.

    python benchmarks/diff_throughput.py [--gb 1.5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# Runs `mdu diff` in a fresh interpreter and reports what only that process can see.
CHILD = r"""
import json, sys, time
start = time.perf_counter()
from mdu_cli.cli import cli
imported = time.perf_counter()
try:
    cli.main(args=sys.argv[1:], prog_name="mdu", standalone_mode=False)
finally:
    done = time.perf_counter()
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"import_s": imported - start, "diff_s": done - imported, "vmhwm_mb": hwm / 1024}),
          file=sys.stderr)
"""


def build_pair(root: Path, total_gb: float) -> None:
    """Two checkpoints: an embedding (the largest tensor) and layer matrices.
    The other side changes a sparse subset of elements, like unlearning does."""
    total = int(total_gb * 1e9 / 4)
    embedding = total // 7
    layer_tensor = 12 * 1024 * 1024
    names = [("model.embed_tokens.weight", embedding)]
    remaining, i = total - embedding, 0
    while remaining >= layer_tensor:
        kind = ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")[i % 3]
        names.append((f"model.layers.{i // 3}.{kind}.weight", layer_tensor))
        remaining -= layer_tensor
        i += 1
    gen = torch.Generator().manual_seed(0)
    sides = {"base": (root / "base", 400e6), "other": (root / "other", 300e6)}  # different shard sizes
    pending = {side: {} for side in sides}
    maps = {side: {} for side in sides}
    counts = {side: 0 for side in sides}

    def flush(side):
        directory, _ = sides[side]
        counts[side] += 1
        file = f"model-{counts[side]:05d}.safetensors"
        save_file(pending[side], directory / file, metadata={"format": "pt"})
        maps[side].update({name: file for name in pending[side]})
        pending[side] = {}

    for directory, _ in sides.values():
        directory.mkdir(parents=True)
    for name, numel in names:
        base = torch.randn(numel, generator=gen)
        other = base.clone()
        other[::97] += 1e-4 * torch.randn(other[::97].shape, generator=gen)
        for side, tensor in (("base", base), ("other", other)):
            pending[side][name] = tensor
            if sum(t.numel() * 4 for t in pending[side].values()) >= sides[side][1]:
                flush(side)
    for side in sides:
        if pending[side]:
            flush(side)
        (sides[side][0] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": maps[side]}))


def files_of(*directories: Path) -> list[str]:
    return [str(p) for d in directories for p in sorted(d.glob("*.safetensors"))]


def time_cat(files: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], check=True)
    return time.perf_counter() - start


def run_diff(base: Path, other: Path, report: Path, engine: str = "auto") -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "diff", str(base), str(other), "-q", "--json", str(report)],
                          capture_output=True, text=True, env={**os.environ, "MDU_DIFF_ENGINE": engine})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mdu diff failed:\n{proc.stderr}")
    figures = json.loads(proc.stderr.strip().splitlines()[-1])
    figures["wall_s"] = wall
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.5, help="size of each side in GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build (or reuse) the pair here instead of a temp dir")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="mdu-diff-bench-"))
    try:
        if not (root / "base").is_dir():
            print(f"building two {args.gb} GB checkpoints in {root} ...", file=sys.stderr)
            build_pair(root, args.gb)
        base, other = root / "base", root / "other"
        from mdu_cli.io.safetensors_reader import open_checkpoint

        largest = max(i.numel * i.itemsize for i in open_checkpoint(str(base)).tensors.values())
        files = files_of(base, other)
        size = sum(os.path.getsize(f) for f in files)
        time_cat(files)  # warm the page cache

        cats, diffs, numpy_diffs = [], [], []
        for _ in range(args.repeats):
            cats.append(time_cat(files))
            diffs.append(run_diff(base, other, root / "report.json"))
            numpy_diffs.append(run_diff(base, other, root / "report-numpy.json", "numpy"))
        cat_s = statistics.median(cats)
        wall_s = statistics.median(d["wall_s"] for d in diffs)
        engine_s = statistics.median(d["diff_s"] for d in diffs)
        import_s = statistics.median(d["import_s"] for d in diffs)
        peak_mb = max(d["vmhwm_mb"] for d in diffs)
        report = json.loads((root / "report.json").read_text())
        budget_mb = 3 * largest / 1e6 + 300
        elements = report["total"]["numel"]

        print(f"pair: 2 x {size / 2e9:.2f} GB fp32 ({len(files)} shards, sharded differently), "
              f"{len(report['tensors'])} tensors, largest {largest / 1e6:.0f} MB, {os.cpu_count()} CPUs")
        print(f"  raw read (cat, warm cache)   {cat_s:.2f}s   {size / cat_s / 1e9:.2f} GB/s")
        from mdu_cli.diff.report import engine

        print(f"  mdu diff wall                {wall_s:.2f}s   ratio {wall_s / cat_s:.2f} (target <= 2), "
              f"{engine()} kernel")
        print(f"    of which start-up/imports  {import_s:.2f}s; comparison {engine_s:.2f}s "
              f"({elements / engine_s / 1e6:.0f} M element pairs/s, ratio {engine_s / cat_s:.2f})")
        print(f"  peak RSS                     {peak_mb:.0f} MB   budget 3 x largest + 300 = {budget_mb:.0f} MB "
              f"({'within' if peak_mb <= budget_mb else 'OVER'})")
        numpy_wall = statistics.median(d["wall_s"] for d in numpy_diffs)
        print(f"  numpy fallback (MDU_DIFF_ENGINE=numpy) wall {numpy_wall:.2f}s   ratio {numpy_wall / cat_s:.2f}")
        llada_elements, llada_bytes = 8.016e9, 16.03e9 * 2
        print(f"  projection, LLaDA-8B pair (bf16, 2 x 16 GB, 8.0e9 element pairs): comparison ~"
              f"{llada_elements / (elements / engine_s):.0f}s at this element rate; a raw read of "
              f"{llada_bytes / 1e9:.0f} GB at the measured cat rate ~{llada_bytes / (size / cat_s):.0f}s (warm) "
              "or at disk speed when cold")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
