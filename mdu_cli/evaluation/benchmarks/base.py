"""The protocol a benchmark of `mdu eval --benchmark` follows.

`evaluation.report.run_eval` reads the files, loads each model once and calls
these hooks in order: `files` (which splits, from which files), `check` (every
cheap check, before any weights load; returns what `finish` needs), `evaluate`
(one model's split reports) and `finish` (the whole report). `format` prints
it, `card_lines` puts its headline into a model card. A spec module imports
no torch, so that `mdu eval --help` lists the benchmarks and their options.

Optional hooks, for a benchmark with files of its own shape (RWKU): `read`
(options, limit -> files, sets, checked) in place of `files` and `check`;
`resolve_generation` (its own lengths per part); `check_lengths`; and, with
`takes_base = True`, `with_base` (the side-by-side change). With
`own_generation = True` the command passes only the generation options given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol


@dataclass(frozen=True)
class BenchmarkOption:
    """One option of `mdu eval` that belongs to a benchmark (`run_eval`'s
    keyword `name`); the command builds its Click option from this."""

    flag: str
    name: str
    help: str
    choices: Optional[tuple[str, ...]] = None
    default: Optional[str] = None
    is_file: bool = False      # a local file (a report), not a data file that may be hf://...
    multiple: bool = False     # repeatable; the value is a tuple


class Benchmark(Protocol):
    name: str
    summary: str
    options: tuple[BenchmarkOption, ...]

    def files(self, forget: Optional[str], retain: Optional[str], options: dict) -> dict[str, Optional[str]]: ...

    def check(self, datasets: dict, splits: dict, options: dict, limit: Optional[int], mc_samples: int,
              seed: int) -> Any: ...

    def evaluate(self, loaded, splits: dict, mc_samples: int, seed: int, generation: dict, batch_size: int,
                 show_progress: bool) -> dict: ...

    def finish(self, report: dict, checked: Any) -> dict: ...

    def format(self, report: dict) -> str: ...

    def card_lines(self, report: dict, fmt) -> list[str]: ...


def format_number(value) -> str:
    """A table cell of a benchmark's number: four significant digits, '-' for none."""
    return "-" if value is None else f"{value:.4g}"
