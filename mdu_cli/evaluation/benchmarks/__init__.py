"""The benchmarks of `mdu eval --benchmark`. `BENCHMARKS` is the registry: one
module (or package) per benchmark following `base.Benchmark`, one line here.
Torch-free to import."""

from mdu_cli.evaluation.benchmarks import rwku, tofu
from mdu_cli.evaluation.benchmarks.base import Benchmark, BenchmarkOption

BENCHMARKS: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in (tofu.BENCHMARK, rwku.BENCHMARK)}

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkOption"]
