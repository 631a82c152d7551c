"""torch.compile of the transformer blocks (`--compile-blocks`).

Each block is compiled in place (`Module.compile`), so parameter names, hooks
and state dicts are untouched: checkpointing wraps the compiled block's
forward as before, LoRA's layers live inside it, and the saved weights are
named as without it. Blocks rather than the whole model: every block has the
same shapes, so one compiled graph serves all of them, and the remote-code
model's own forward (masks, rotary tables) stays as its authors wrote it.
What it buys is fewer, fused kernel launches per block; what it costs is
the compilation in the first steps, and numbers that differ from the eager
ones at rounding level (fused kernels round in another order).
"""

from __future__ import annotations

from mdu_cli.model.checkpointing import transformer_blocks


def compile_blocks(model, backend: str = "inductor") -> int:
    """Compile every transformer block of `model` in place; returns how many."""
    blocks = transformer_blocks(model, "--compile-blocks")
    for block in blocks:
        # dynamic: sequence lengths vary from batch to batch; without it each
        # new length would recompile.
        block.compile(backend=backend, dynamic=True)
    return len(blocks)


def check_compile(device: str) -> None:
    """Refuse --compile-blocks where torch.compile cannot build its kernels,
    before any weight loads: on the CPU it needs a C++ compiler, on CUDA the
    triton package (which torch's CUDA wheels bring)."""
    import importlib.util
    import shutil

    from mdu_cli.errors import ConfigError

    if device == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--compile-blocks on CUDA needs the triton package (pip install triton), or leave "
                              "out --compile-blocks")
    elif not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        raise ConfigError("--compile-blocks on the CPU needs a C++ compiler (c++, g++ or clang++ on PATH); "
                          "install one, or leave out --compile-blocks")
