"""The benchmarks of `mdu eval --benchmark`."""
