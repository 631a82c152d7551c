"""--compile-blocks: torch.compile of every transformer block of the trained
model, in place (mdu_cli/model/compilation.py)."""

import functools

import pytest
import torch
from click.testing import CliRunner
from test_hostile_inputs import snapshot

from mdu_cli.cli import cli
from mdu_cli.config.training import build_config
from mdu_cli.model import compilation
from mdu_cli.train.run import run_unlearn


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_compiled_blocks_train_to_the_weights_of_eager_ones(family, family_dirs, forget_file, retain_file, tmp_path,
                                                            monkeypatch):
    """The wiring, with dynamo's "eager" backend standing in for inductor (which
    would compile C++ for a minute here): every block of the trained model is
    compiled, its state dict keeps its names, and the weights are the eager
    run's. Inductor's fused kernels change the numbers at rounding level; that
    is measured on a GPU (benchmarks/gpu_check.py), not asserted here."""
    monkeypatch.setattr(compilation, "compile_blocks", functools.partial(compilation.compile_blocks,
                                                                         backend="eager"))
    results = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        cfg = build_config({}, dict(model=str(family_dirs[family]), forget=str(forget_file), retain=str(retain_file),
                                    out=str(tmp_path / name), max_steps=2, batch_size=2, grad_accum=2, lr=1e-3,
                                    device="cpu", compile_blocks=compiled))
        results[name] = run_unlearn(cfg, show_progress=False, keep_model=True)
    blocks = compilation.transformer_blocks(results["compiled"].model)
    assert all(block._compiled_call_impl is not None for block in blocks)
    eager, compiled = results["eager"].model.state_dict(), results["compiled"].model.state_dict()
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(eager[k], results["eager"].anchor.state_dict()[k]) for k in eager), "it trained"


def test_compile_blocks_without_a_compiler_is_a_usage_error_before_loading(llada_dir, forget_file, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    before = snapshot(forget_file, llada_dir)
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--out",
                                      str(tmp_path / "out"), "--compile-blocks", "--device", "cpu"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --compile-blocks on the CPU needs a C++ compiler (c++, g++ or clang++ on PATH); install one, or "
        "leave out --compile-blocks")
    assert snapshot(forget_file, llada_dir) == before and not (tmp_path / "out").exists()
