"""Rerun the numerically sensitive tests under every CPU kernel level torch offers here.

    python tests/cpu_kernels.py [PYTEST ARGS...]

PyTorch's CPU build picks its vectorised kernels at start-up (AVX-512, AVX2
or the scalar `default` ones on x86) and ATEN_CPU_CAPABILITY forces a lower
level. The levels round differently in the last bits, and a long training
run amplifies those bits, so a test whose assertion rides on a trajectory
can pass on one machine and fail on the next. The tests marked `numerics`
(tests/conftest.py says which) run here once per level: `default` and
`avx2`, each skipped when this CPU lacks it or when it is the native level
that the ordinary `pytest` run already covered. The README's test command
runs everything natively; `.ci/run` runs this after it.

Exits non-zero when any level fails, after running all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("avx2", "default")
PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability())"


def capability(level: str | None) -> str:
    """The kernel level torch actually runs with ATEN_CPU_CAPABILITY=level
    (None: unset, the native one). torch falls back silently to what the CPU
    has, so a level is supported exactly when it is reported back."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if level is not None:
        env["ATEN_CPU_CAPABILITY"] = level
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                           timeout=300)
    return probe.stdout.strip().upper()


def main(pytest_args: list[str]) -> int:
    native = capability(None)
    print(f"cpu kernels: native level {native}", flush=True)
    failed, checked = [], []
    for level in LEVELS:
        reported = capability(level)
        if reported == native:
            print(f"cpu kernels: {level} is the native level, covered by the ordinary run", flush=True)
            continue
        if reported != level.upper():
            print(f"cpu kernels: {level} is not available on this CPU (torch runs {reported}); skipped", flush=True)
            continue
        print(f"cpu kernels: the numerics tests under ATEN_CPU_CAPABILITY={level}", flush=True)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"mdu-inductor-{level}-") as inductor_cache:
            # A cache of its own: torch.compile's kernels (torchao's optimizers
            # compile their step) are cached without the kernel level in the
            # key, and a kernel compiled under AVX-512 and replayed under
            # ATEN_CPU_CAPABILITY=avx2 gave wrong updates here.
            env = dict(os.environ, ATEN_CPU_CAPABILITY=level, TORCHINDUCTOR_CACHE_DIR=inductor_cache)
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-p", "no:cacheprovider",
                                  *pytest_args], cwd=ROOT, env=env)
        print(f"cpu kernels: {level} {'passed' if run.returncode == 0 else 'FAILED'} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        checked.append(level)
        if run.returncode != 0:
            failed.append(level)
    print(f"cpu kernels: native {native}; rerun under {', '.join(checked) or 'no other level'}; "
          f"{'failed under ' + ', '.join(failed) if failed else 'all passed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
