"""`mdu eval`'s report (docs/method.md section 4): `run_eval` evaluates one
model (and a base beside it) through a benchmark's hooks; without
--benchmark, the plain forget/retain evaluation of this module:

- answer probability, by the Monte Carlo estimator of `likelihood.py`;
- ROUGE-L recall of a greedy generation against the gold answer (`rouge.py`);
- the geometric truth ratio exp(score(gold) - mean score(perturbed answers))
  for records with perturbed answers (not TOFU's R: docs/eval.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from mdu_cli.config.generation import DEFAULT_GENERATION, resolve_generation
from mdu_cli.data.records import Dataset, Record, load_dataset
from mdu_cli.data.tokenization import encode_text
from mdu_cli.diff.format import text_table
from mdu_cli.errors import ConfigError
from mdu_cli.evaluation.likelihood import ESTIMATOR, answer_score_many
from mdu_cli.evaluation.rouge import rouge_scores
from mdu_cli.io.output_location import EVAL_REPORT, RUN_RECORD, check_report_file
from mdu_cli.model.inference import LoadedModel, prepare_inference

EVAL_FILE = EVAL_REPORT


def geometric_truth_ratio(gold_score: float, perturbed_scores: list[float]) -> float:
    """`mdu eval`'s truth ratio of one record: exp(score(gold) - mean score(perturbed)),
    the geometric mean over the perturbed answers of P(perturbed) / P(gold)
    (per-token probabilities). Not TOFU's R (`benchmarks.tofu.truth_ratio`,
    an arithmetic mean over the paraphrased answer); docs/eval.md sets the two
    side by side."""
    return math.exp(gold_score - sum(perturbed_scores) / len(perturbed_scores))


def check_lengths(loaded: LoadedModel, records: list[Record], generation: dict) -> None:
    """Every scored sequence (prompt + answer, prompt + each perturbed answer)
    and every generation (prompt + max_new_tokens) within the model's positions."""
    if loaded.positions is None:
        return
    new_tokens = generation.get("max_new_tokens", 0)
    for record in records:
        prompt = len(loaded.prompt_ids(record.prompt_messages, where=record.source))
        for answer in (record.response, *record.perturbed, *([record.paraphrased] if record.paraphrased else [])):
            answer_tokens = len(encode_text(loaded.tokenizer, answer))
            loaded.check_length(prompt + answer_tokens, record.source, "the prompt with its answer")
        if new_tokens:
            loaded.check_length(prompt + new_tokens, record.source,
                                f"the prompt with --max-new-tokens {new_tokens}")


def evaluate_split(loaded: LoadedModel, records: list[Record], mc_samples: int, seed: int, generation: dict,
                   batch_size: int = 32, desc: str = "eval", show_progress: bool = True,
                   estimator: str = ESTIMATOR) -> dict:
    generator = torch.Generator().manual_seed(seed)
    probabilities, ratios = [], []
    for record in tqdm(records, desc=desc, unit="record", disable=not show_progress, dynamic_ncols=True):
        prompt_ids = loaded.prompt_ids(record.prompt_messages, where=record.source)
        # The gold answer and the perturbed ones, their samples in shared forwards.
        gold, *wrong = answer_score_many(loaded, prompt_ids, [record.response, *record.perturbed], mc_samples,
                                         generator, batch_size, estimator)
        probabilities.append(math.exp(-gold))
        if record.perturbed:
            ratios.append(geometric_truth_ratio(gold, wrong))
    result = {"records": len(records), "probability": sum(probabilities) / len(probabilities)}
    if generation.get("max_new_tokens", 0) > 0:
        # Prompts batched across records, as the TOFU path does.
        rouges = rouge_scores(loaded, records, generation, batch_size)
        result["rouge_l"] = sum(rouges) / len(rouges)
    if ratios:
        result["truth_ratio"] = sum(ratios) / len(ratios)
    return result


class ForgetRetain:
    """Plain `mdu eval` (no --benchmark): answer probability, ROUGE-L and the
    geometric truth ratio on the forget and retain files, optionally beside a
    base model. It follows the benchmark protocol (benchmarks/base.py), so
    `run_eval` has one path for every kind of evaluation."""

    name = None
    options = ()

    def files(self, forget: Optional[str], retain: Optional[str], options: dict) -> dict[str, Optional[str]]:
        if not forget:
            raise ConfigError("--forget is required (or a --benchmark, which has its own files: "
                              "tofu or rwku)")
        return {"forget": forget, "retain": retain}

    def inputs(self, options: dict) -> list[Path]:
        return []

    def check(self, datasets, splits, options, limit, mc_samples, seed) -> None:
        return None

    def evaluate(self, loaded, splits: dict, mc_samples: int, seed: int, generation: dict, batch_size: int,
                 show_progress: bool) -> dict:
        return {split: evaluate_split(loaded, records, mc_samples, seed, generation, batch_size,
                                      desc=f"eval {split}", show_progress=show_progress)
                for split, records in splits.items()}

    def finish(self, report: dict, checked) -> dict:
        return report

    def format(self, report: dict) -> str:
        return format_forget_retain(report)


FORGET_RETAIN = ForgetRetain()


def benchmark_named(name: Optional[str]):
    """The registry's entry for --benchmark NAME, or the plain evaluation."""
    from mdu_cli.evaluation.benchmarks import BENCHMARKS

    if name is None:
        return FORGET_RETAIN
    if name not in BENCHMARKS:
        raise ConfigError(f"--benchmark must be one of {', '.join(BENCHMARKS)} (got {name!r})")
    return BENCHMARKS[name]


def run_eval(model: str, forget: Optional[str] = None, retain: Optional[str] = None, base: Optional[str] = None,
             mc_samples: int = 128, limit: Optional[int] = None, seed: int = 0, generation: Optional[dict] = None,
             batch_size: int = 32, device: str = "auto", trust_remote_code: bool = False,
             show_progress: bool = True, write: bool = True, benchmark: Optional[str] = None,
             tasks: Optional[list[str]] = None, num_fewshot: Optional[int] = None,
             include_path: Optional[str] = None, apply_chat_template: bool = False,
             **benchmark_options) -> dict:
    """Evaluate MODEL (and BASE, side by side) on the forget and retain files,
    or on a benchmark's splits (`--benchmark tofu`: TOFU's four, with forget
    quality and model utility; its options, such as `reference=`, are the
    keywords its registry entry declares), and on lm-eval `tasks` (alone, or
    beside either). When MODEL is an `mdu` output directory, the report is
    also written there as eval.json, for the card."""
    harness = None
    if tasks:
        # lm-eval installed, every task known: before any file is read or weight loaded.
        from mdu_cli.evaluation.harness import check_tasks, require_lm_eval, task_manager

        version = require_lm_eval()
        manager = task_manager(include_path)
        harness = {"lm_eval_version": version, "tasks": check_tasks(list(tasks), manager),
                   "num_fewshot": num_fewshot, "limit": limit, "apply_chat_template": apply_chat_template,
                   "include_path": include_path, "mc_samples": mc_samples, "manager": manager}
    tasks_only = harness is not None and benchmark is None and not forget and not retain
    bench = benchmark_named(benchmark)
    known = {option.name for option in bench.options}
    unknown = sorted(set(benchmark_options) - known)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} apply to another --benchmark than {benchmark or 'none'}")
    if base and not getattr(bench, "takes_base", bench is FORGET_RETAIN):
        raise ConfigError(f"--base does not combine with --benchmark {benchmark}; evaluate each model on its own "
                          "and compare the reports")
    files = {} if tasks_only else bench.files(forget, retain, benchmark_options)
    generation = dict(generation if generation is not None else DEFAULT_GENERATION)
    if tasks_only:
        datasets, splits, checked = {}, {}, None
    elif hasattr(bench, "read"):
        # A benchmark with files of its own shape reads and checks them itself.
        datasets, splits, checked = bench.read(benchmark_options, limit)
    else:
        datasets: dict[str, Dataset] = {name: load_dataset(path) for name, path in files.items() if path}
        splits = {name: list(data.records[:limit] if limit else data.records) for name, data in datasets.items()}
        checked = bench.check(datasets, splits, benchmark_options, limit, mc_samples, seed)

    model_dir = Path(model)
    target = model_dir / EVAL_FILE if write and model_dir.is_dir() and (model_dir / RUN_RECORD).is_file() else None
    if target is not None:
        check_report_file(target, EVAL_FILE, [data.path for data in datasets.values()]
                          + bench.inputs(benchmark_options))

    # Every model's config, tokenizer and lengths are checked before any weights load.
    prepared = {name: prepare_inference(name, trust_remote_code=trust_remote_code, device=device)
                for name in ([model, base] if base else [model])}
    # A preset's values depend on the family; the report names what was used.
    family = prepared[model].family.name
    generation = (bench.resolve_generation(generation, family) if hasattr(bench, "resolve_generation")
                  else resolve_generation(generation, family))
    for loaded in prepared.values():
        if hasattr(bench, "check_lengths"):
            bench.check_lengths(loaded, splits, generation)
        else:
            check_lengths(loaded, [r for records in splits.values() for r in records], generation)

    tasks_results: dict[str, dict] = {}

    def evaluate(name: str) -> dict:
        loaded = prepared[name].load_weights()
        try:
            splits_report = {} if tasks_only else bench.evaluate(loaded, splits, mc_samples, seed, generation,
                                                                 batch_size, show_progress)
            if harness is not None:
                from mdu_cli.evaluation.harness.run import run_tasks

                tasks_results[name] = run_tasks(loaded, harness["tasks"], harness["manager"], num_fewshot, limit,
                                                apply_chat_template, mc_samples, batch_size, seed, show_progress)
            return splits_report
        finally:
            loaded.model = None  # one model in memory at a time

    report = {"model": model, "mc_samples": mc_samples, "estimator": ESTIMATOR, "seed": seed, "limit": limit,
              "generation": generation,
              "data": {split: data.summary() for split, data in datasets.items()}}
    report["splits"] = evaluate(model)
    if not tasks_only:
        report = bench.finish(report, checked)
    if base:
        report["base"] = {"model": base, "splits": evaluate(base)}
    if base and not tasks_only:
        if hasattr(bench, "with_base"):
            report = bench.with_base(report, report["base"]["splits"])
        else:
            report["change"] = relative_change(report["splits"], report["base"]["splits"])
    if harness is not None:
        report["lm_eval"] = {**{k: v for k, v in harness.items() if k != "manager"},
                             "model": tasks_results[model], **({"base": tasks_results[base]} if base else {})}
    if target is not None:
        from mdu_cli.io.atomic import write_text_atomic

        write_text_atomic(target, json.dumps(report, indent=2) + "\n")
    return report


def relative_change(model_splits: dict, base_splits: dict) -> dict:
    """Per split and metric, model / base - 1 (negative: the model scores
    lower than its base); None where the base value is 0 or missing."""
    return {
        split: {metric: (value / base_splits[split][metric] - 1 if base_splits[split].get(metric) else None)
                for metric, value in metrics.items() if metric != "records"}
        for split, metrics in model_splits.items()
    }


def format_eval(report: dict) -> str:
    """The report as a terminal table, by the benchmark that wrote it, then
    the lm-eval tasks' (when it ran any)."""
    parts = []
    if report.get("splits"):
        parts.append(benchmark_named(report.get("benchmark")).format(report))
    if report.get("lm_eval"):
        from mdu_cli.evaluation.harness.run import format_tasks

        parts.append(format_tasks(report))
    return "\n\n".join(parts)


def format_forget_retain(report: dict) -> str:
    metrics = ("probability", "rouge_l", "truth_ratio")
    has_base = "base" in report
    header = ["split", "metric"] + (["base", "model", "change"] if has_base else ["model"])
    rows = []
    for split, values in report["splits"].items():
        for metric in metrics:
            if metric not in values:
                continue
            row = [split, metric]
            if has_base:
                base_value = report["base"]["splits"][split].get(metric)
                change = report["change"][split].get(metric)
                row += [f"{base_value:.4f}" if base_value is not None else "-", f"{values[metric]:.4f}",
                        f"{100 * change:+.0f}%" if change is not None else "-"]
            else:
                row.append(f"{values[metric]:.4f}")
            rows.append(row)
    return text_table(header, rows)
