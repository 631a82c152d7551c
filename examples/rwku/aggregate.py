"""One RWKU table from many per-target reports: the mean over targets, per tau.

    python examples/rwku/aggregate.py REPORT.json [REPORT.json ...]

Each REPORT is what `mdu eval MODEL --benchmark rwku --target NAME --base
ORIGINAL --json` printed (or the eval.json it wrote into MODEL). A report's
tau (and method) come from MODEL's mdu_run.json; the original model's row is
the mean of the reports' --base columns, one per target. Prints a Markdown
table: one row per (method, tau), each RWKU measure averaged over the targets
that have it, and how many targets that is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from mdu_cli.evaluation.benchmarks.rwku import TABLE  # noqa: E402

COLUMNS = [key for key, _ in TABLE]


def run_of(model: str) -> tuple[str, str]:
    """(method, tau) of the run that wrote MODEL, from its mdu_run.json."""
    try:
        run = json.loads((Path(model) / "mdu_run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ("?", "?")
    config = run.get("config") or {}
    return (str(config.get("method", run.get("method", "?"))), f"{config.get('tau', '-')}")


def aggregate(reports: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, tau) -> {"targets": set, column: [values]}; the originals under ("original", "-")."""
    groups: dict[tuple[str, str], dict] = {}

    def add(key, target, table):
        group = groups.setdefault(key, {"targets": set(), **{c: [] for c in COLUMNS}})
        if target in group["targets"]:
            return  # the same original, beside several taus, counts once
        group["targets"].add(target)
        for column in COLUMNS:
            if table.get(column) is not None:
                group[column].append(table[column])

    for report in reports:
        if report.get("benchmark") != "rwku":
            raise SystemExit(f"{report.get('model')}: not an RWKU report (run mdu eval --benchmark rwku)")
        if report.get("base"):
            add(("original", "-"), report["target"], report["base"]["table"])
        add(run_of(report["model"]), report["target"], report["table"])
    return groups


def markdown(groups: dict) -> str:
    # Only the measures some report has (a run of --part forget has no utility columns).
    columns = [c for c in COLUMNS if any(group[c] for group in groups.values())]
    header = "| method | tau | targets | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 3)]
    order = sorted(groups, key=lambda k: (k[0] != "original", k[0], k[1]))
    for method, tau in order:
        group = groups[(method, tau)]
        cells = [f"{sum(v) / len(v):.3f}" if v else "-" for v in (group[c] for c in columns)]
        lines.append(f"| {method} | {tau} | {len(group['targets'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> str:
    reports = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    return markdown(aggregate(reports))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(main(sys.argv[1:]))
