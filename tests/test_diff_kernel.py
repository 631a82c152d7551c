"""The native kernel of `mdu diff` (mdu_cli/_diffkernel.c) against float64
references computed here with torch's own dtype conversions and plain
Python sums, which share nothing with the kernel's widening or reduction."""

import math

import numpy as np
import pytest
import torch

from mdu_cli.diff import report as delta_report
from mdu_cli.errors import MduError

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics

# The extension builds wherever the README's install runs (gcc and the Python
# headers); a missing build is a failure here, not a skip, because `mdu diff`
# would silently run several times slower.
try:
    from mdu_cli.diff import _diffkernel as kernel
except ImportError:
    pytest.fail("mdu_cli.diff._diffkernel is not built: reinstall (pip install -e .) where gcc or clang and the Python "
                "headers are present", pytrace=False)

KIND = {torch.float64: kernel.F64, torch.float32: kernel.F32, torch.bfloat16: kernel.BF16,
        torch.float16: kernel.F16}
GEN = torch.Generator().manual_seed(3)


def _raw(tensor: torch.Tensor) -> bytes:
    """The little-endian bytes safetensors would store."""
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _reference(a: torch.Tensor, b: torch.Tensor) -> tuple:
    xs, ys = a.to(torch.float64).tolist(), b.to(torch.float64).tolist()
    diffs = [y - x for x, y in zip(xs, ys)]
    max_abs = max((abs(d) for d in diffs), default=0.0)
    if any(math.isnan(d) for d in diffs):
        max_abs = math.nan
    return (math.fsum(d * d for d in diffs), math.fsum(x * x for x in xs), math.fsum(y * y for y in ys),
            math.fsum(abs(d) for d in diffs), max_abs, sum(x != y for x, y in zip(xs, ys)))


def _check(got: tuple, want: tuple) -> None:
    for index, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, float) and math.isnan(w):
            assert math.isnan(g), index
        else:
            assert g == pytest.approx(w, rel=1e-12, abs=0), index


@pytest.mark.parametrize("base_dtype", list(KIND))
@pytest.mark.parametrize("other_dtype", list(KIND))
@pytest.mark.parametrize("count", [0, 1, 1023, 1024, 1025, 5000])  # around the kernel's 1024-element block
def test_sums_match_float64_reference(base_dtype, other_dtype, count):
    base = torch.randn(count, generator=GEN) * 3
    other = base.clone()
    other[::3] += torch.randn(other[::3].shape, generator=GEN) * 1e-2
    base, other = base.to(base_dtype), other.to(other_dtype)
    got = kernel.sums(_raw(base), KIND[base_dtype], _raw(other), KIND[other_dtype], count)
    _check(got, _reference(base, other))
    assert isinstance(got[5], int)


def test_every_fp16_value_widens_exactly():
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = every[torch.isfinite(every)]
    # Against zeros, sq_base is the exact sum of squares of every finite half.
    got = kernel.sums(_raw(finite), kernel.F16, _raw(torch.zeros_like(finite)), kernel.F16, finite.numel())
    _check(got, _reference(finite, torch.zeros_like(finite)))
    # One element at a time, so no value hides in a sum: the max is the value itself.
    for value in finite[::97].tolist() + [6.0e-8, -6.0e-8, 65504.0]:
        half = torch.tensor([value], dtype=torch.float16)
        assert kernel.sums(_raw(half), kernel.F16, _raw(torch.zeros(1, dtype=torch.float16)), kernel.F16, 1)[4] \
            == abs(half.to(torch.float64).item())


def test_special_values():
    base = torch.tensor([0.0, -0.0, 1.0, math.inf, 2.0, 5.0], dtype=torch.float32)
    other = torch.tensor([-0.0, 0.0, 1.0, math.inf, 3.0, 5.0], dtype=torch.float32)
    got = kernel.sums(_raw(base), kernel.F32, _raw(other), kernel.F32, 6)
    # +0 and -0 are equal and inf equals itself; inf - inf is NaN, which the
    # squared sum carries, and so does max_abs.
    assert got[5] == 1
    assert math.isnan(got[0]) and math.isnan(got[4])
    nan = torch.tensor([math.nan, 1.0])
    got = kernel.sums(_raw(nan), kernel.F32, _raw(nan), kernel.F32, 2)
    assert got[5] == 1 and math.isnan(got[4])


def test_buffers_and_kinds_are_checked():
    four = bytes(16)
    with pytest.raises(ValueError, match="shorter than 5 elements"):
        kernel.sums(four, kernel.F32, four, kernel.F32, 5)
    with pytest.raises(ValueError, match="unknown element kind 7"):
        kernel.sums(four, 7, four, kernel.F32, 1)
    with pytest.raises(TypeError):
        kernel.sums("text", kernel.F32, four, kernel.F32, 1)
    # A read-only memoryview over part of a bytearray, as the reader passes it.
    data = bytearray(np.arange(8, dtype=np.float32).tobytes())
    got = kernel.sums(memoryview(data)[:16], kernel.F32, bytes(16), kernel.F32, 4)
    assert got[1] == 0 + 1 + 4 + 9


def test_engine_choice(monkeypatch):
    monkeypatch.delenv("MDU_DIFF_ENGINE", raising=False)
    assert delta_report.engine() == "native"
    monkeypatch.setenv("MDU_DIFF_ENGINE", "numpy")
    assert delta_report.engine() == "numpy"
    monkeypatch.setenv("MDU_DIFF_ENGINE", "fast")
    with pytest.raises(MduError, match="MDU_DIFF_ENGINE='fast': use auto, native or numpy"):
        delta_report.engine()


def test_native_request_without_the_build_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mdu_cli.diff._diffkernel", None)  # import now raises ImportError
    monkeypatch.setenv("MDU_DIFF_ENGINE", "native")
    with pytest.raises(MduError, match="not built"):
        delta_report.engine()
    monkeypatch.setenv("MDU_DIFF_ENGINE", "auto")
    assert delta_report.engine() == "numpy"
