"""Running lm-eval tasks on a loaded model (`mdu eval --tasks`): the results
as lm-eval reports them (metrics per task, task versions, shots), made
plain JSON, and the terminal and card tables of them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from mdu_cli.errors import MduError

if TYPE_CHECKING:
    from mdu_cli.model.inference import LoadedModel


def _plain(value):
    """lm-eval's numbers (numpy scalars among them) as JSON values; NaN as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def run_tasks(loaded: "LoadedModel", tasks: list[str], manager, num_fewshot: Optional[int], limit: Optional[int],
              apply_chat_template: bool, mc_samples: int, batch_size: int, seed: int,
              show_progress: bool) -> dict:
    """lm-eval's `simple_evaluate` through the `mdu` model on `loaded`."""
    from lm_eval import simple_evaluate

    from mdu_cli.evaluation.harness.model import MduLM

    model = MduLM(loaded=loaded, mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                  show_progress=show_progress)
    try:
        output = simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                 task_manager=manager, apply_chat_template=apply_chat_template,
                                 log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                 torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
    except MduError:
        raise
    except (OSError, ValueError, KeyError) as err:
        # A task whose data cannot be read (offline, a missing local file) or whose config is wrong.
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MduError(f"--tasks {','.join(tasks)}: lm-eval could not run them ({type(err).__name__}: {first}); "
                       "check the task's data (offline: point its dataset at local files) and config") from None
    return {"results": _plain(output["results"]), "versions": _plain(output.get("versions", {})),
            "n-shot": _plain(output.get("n-shot", {})), "higher_is_better": _plain(output.get("higher_is_better", {}))}


def headline(results: dict) -> dict[str, dict[str, float]]:
    """Per task, its metrics without their filters' suffix and without the
    standard errors: {"acc": 0.41, "exact_match": ...}."""
    table = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            name, _, _ = key.partition(",")
            if key in ("alias", "sample_len") or name.endswith("_stderr") or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            row.setdefault(name, value)
        table[task] = row
    return table


def format_tasks(report: dict) -> str:
    from mdu_cli.diff.format import text_table

    harness = report["lm_eval"]
    model = headline(harness["model"])
    base = headline(harness["base"]) if harness.get("base") else None
    header = ["task", "version", "metric"] + (["base", "model", "change"] if base else ["model"])
    rows = []
    for task, metrics in model.items():
        version = harness["model"]["versions"].get(task, "-")
        for metric, value in metrics.items():
            row = [task, str(version), metric]
            if base is not None:
                other = base.get(task, {}).get(metric)
                row += ["-" if other is None else f"{other:.4f}", f"{value:.4f}",
                        "-" if other is None else f"{value - other:+.4f}"]
            else:
                row.append(f"{value:.4f}")
            rows.append(row)
    return text_table(header, rows)


def card_lines(harness: dict, fmt) -> list[str]:
    model = headline(harness["model"])
    base = headline(harness["base"]) if harness.get("base") else None
    lines = [f"lm-evaluation-harness {harness['lm_eval_version']} through the masked-diffusion `mdu` model "
             f"({harness['mc_samples']} Monte Carlo samples per multi-token likelihood):", "",
             "| task | version | metric | " + ("base | " if base else "") + "model |",
             "|---|---|---|" + ("---|" if base else "") + "---|"]
    for task, metrics in model.items():
        for metric, value in metrics.items():
            other = fmt(base.get(task, {}).get(metric)) + " | " if base is not None else ""
            lines.append(f"| {task} | {harness['model']['versions'].get(task, '-')} | {metric} | {other}{fmt(value)} |")
    return lines + [""]
