"""`mdu diff`: the parameter-delta report of one checkpoint against another."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

EXAMPLES = """
\b
Examples:
  # What did unlearning change?
  mdu diff GSAI-ML/LLaDA-8B-Instruct ./LLaDA-8B-Instruct-mdu-tau2
\b
  # Full report as JSON and Markdown, plus a plot of change per layer
  mdu diff base/ unlearned/ --json delta.json --md delta.md --plot delta.png
\b
  # Two Hub revisions of one model
  mdu diff me/model me/model --revision-base v1 --revision-other v2
"""


@click.command(epilog=EXAMPLES)
@click.argument("base")
@click.argument("other")
@click.option("--revision-base", help="Hub revision of BASE.")
@click.option("--revision-other", help="Hub revision of OTHER.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the full report as JSON (schema_version 1).")
@click.option("--md", "md_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as Markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG of relative change per layer and module kind (needs matplotlib).")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="Tensors listed by largest relative change.")
@click.option("--quiet", "-q", is_flag=True, help="No table on stdout and no progress bar.")
def diff(base, other, revision_base, revision_other, json_path, md_path, plot_path, top, quiet) -> None:
    """Compare the weights of OTHER against BASE, tensor by tensor.

    Each side is a checkpoint directory (sharded or not), a single .safetensors
    file, or a Hub model id (only safetensors, the index and config.json are
    fetched). Tensors are joined by name, statistics accumulated in float64,
    and memory stays bounded: tensors are streamed in chunks.
    """
    # numpy's OpenBLAS would start its own threads inside each of the diff's
    # chunk threads and slow both down; it reads this only when first loaded.
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from mdu_cli.diff.format import format_markdown, format_table, write_json, write_plot
    from mdu_cli.diff.report import check_report_outputs
    from mdu_cli.diff.report import diff as run_diff
    from mdu_cli.io.atomic import write_text_atomic

    check_report_outputs(base, other, {"--json": json_path, "--md": md_path, "--plot": plot_path})

    report = run_diff(base, other, revision_base, revision_other, top=max(top, 20), show_progress=not quiet)
    if json_path:
        write_json(report, json_path)
    if md_path:
        write_text_atomic(md_path, format_markdown(report, top))
    if plot_path:
        write_plot(report, plot_path)
    if not quiet:
        click.echo(format_table(report, top))
