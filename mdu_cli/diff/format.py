"""Rendering a delta report: a terminal table, Markdown for a model card, a plot."""

from __future__ import annotations

import json
from pathlib import Path

from mdu_cli.errors import MduError
from mdu_cli.io.atomic import write_text_atomic

STAT_COLUMNS = ("rel_l2", "l2", "max_abs", "mean_abs", "cosine", "frac_changed")
HEADERS = {"rel_l2": "rel_l2", "l2": "l2", "max_abs": "max_abs", "mean_abs": "mean_abs", "cosine": "cosine",
           "frac_changed": "changed"}


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "cosine":
        return f"{value:.8f}"
    if key == "frac_changed":
        return f"{100 * value:.1f}%"
    return f"{value:.3e}"


def _rows(entries: list[dict], key: str) -> list[list[str]]:
    return [[str(entry[key])] + [_cell(c, entry[c]) for c in STAT_COLUMNS] for entry in entries]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing blanks."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _summary_lines(report: dict) -> list[str]:
    total = report["total"]
    return [
        f"base:  {report['base']['source']}" + _at(report["base"]["revision"]),
        f"other: {report['other']['source']}" + _at(report["other"]["revision"]),
        f"compared {total['tensors']} tensors, {total['numel']:,} elements; "
        f"only in base {len(report['only_in_base'])}, only in other {len(report['only_in_other'])}, "
        f"shape mismatches {len(report['shape_mismatch'])}, tied {len(report['tied'])}",
        "total: " + "  ".join(f"{HEADERS[c]} {_cell(c, total[c])}" for c in STAT_COLUMNS),
    ]


def format_table(report: dict, top: int = 10) -> str:
    header = [HEADERS[c] for c in STAT_COLUMNS]
    parts = ["\n".join(_summary_lines(report))]
    if report["layers"]:
        parts.append("per layer\n" + text_table(["layer"] + header, _rows(report["layers"], "layer")))
    if report["modules"]:
        parts.append("per module kind\n" + text_table(["module"] + header, _rows(report["modules"], "module")))
    by_name = {t["name"]: t for t in report["tensors"]}
    ranked = [by_name[t["name"]] for t in report["top"][:top]]
    if ranked:
        parts.append(f"top {len(ranked)} tensors by rel_l2\n" + text_table(["tensor"] + header, _rows(ranked, "name")))
    for key, title in (("only_in_base", "only in base"), ("only_in_other", "only in other")):
        if report[key]:
            parts.append(f"{title}: " + ", ".join(e["name"] for e in report[key]))
    if report["shape_mismatch"]:
        parts.append("shape mismatch: " + ", ".join(
            f"{e['name']} {e['shape_base']} vs {e['shape_other']}" for e in report["shape_mismatch"]))
    if report["tied"]:
        parts.append("tied (stored once): " + ", ".join(
            f"{e['name']} ({e['side']}) = {e['tied_to']}" for e in report["tied"]))
    return "\n\n".join(parts)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_markdown(report: dict, top: int = 10) -> str:
    header = [HEADERS[c] for c in STAT_COLUMNS]
    total = report["total"]
    out = [
        "## Parameter delta",
        "",
        f"{total['tensors']} tensors ({total['numel']:,} elements) compared against the base. "
        f"Relative L2 change of all weights: **{_cell('rel_l2', total['rel_l2'])}**; "
        f"elements changed: {_cell('frac_changed', total['frac_changed'])}; "
        f"cosine to the base: {_cell('cosine', total['cosine'])}.",
        "",
    ]
    if report["layers"]:
        out += ["### Per layer", "", _md_table(["layer"] + header, _rows(report["layers"], "layer")), ""]
    if report["modules"]:
        out += ["### Per module kind", "", _md_table(["module"] + header, _rows(report["modules"], "module")), ""]
    by_name = {t["name"]: t for t in report["tensors"]}
    ranked = [by_name[t["name"]] for t in report["top"][:top]]
    if ranked:
        rows = [[f"`{row[0]}`"] + row[1:] for row in _rows(ranked, "name")]
        out += [f"### Top {len(ranked)} tensors by relative change", "", _md_table(["tensor"] + header, rows), ""]
    notes = []
    for key, title in (("only_in_base", "Only in the base"), ("only_in_other", "Only in this model")):
        if report[key]:
            notes.append(f"- {title}: " + ", ".join(f"`{e['name']}`" for e in report[key]))
    if report["shape_mismatch"]:
        notes.append("- Shape mismatch: " + ", ".join(f"`{e['name']}`" for e in report["shape_mismatch"]))
    if report["tied"]:
        notes.append("- Tied, stored once: " + ", ".join(f"`{e['name']}` = `{e['tied_to']}`" for e in report["tied"]))
    if notes:
        out += notes + [""]
    return "\n".join(out)


def write_json(report: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def write_plot(report: dict, path: Path) -> None:
    """Relative change per layer, one line per module kind (matplotlib, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MduError("--plot needs matplotlib; install it with: pip install 'mdu-cli[plot]'") from None
    series: dict[str, dict[int, list[float]]] = {}
    for tensor in report["tensors"]:
        if tensor["layer"] is None:
            continue
        cell = series.setdefault(tensor["module"], {}).setdefault(tensor["layer"], [0.0, 0.0])
        cell[0] += tensor["l2"] ** 2
        cell[1] += tensor["norm_base"] ** 2
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for module, layers in sorted(series.items()):
        xs = sorted(layers)
        ys = [(layers[x][0] / layers[x][1]) ** 0.5 if layers[x][1] > 0 else 0.0 for x in xs]
        axis.plot(xs, ys, marker="o", label=module)
    axis.set_xlabel("layer")
    axis.set_ylabel("relative L2 change")
    axis.set_title(f"{report['other']['source']} vs {report['base']['source']}", fontsize=9)
    if series:
        axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _at(revision) -> str:
    return f" @ {revision}" if revision else ""
