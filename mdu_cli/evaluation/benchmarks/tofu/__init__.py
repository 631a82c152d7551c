"""TOFU (`mdu eval --benchmark tofu`): truth ratios, forget quality and model
utility over forget, retain, real authors and world facts, on masked-diffusion
likelihoods. The measures themselves are in `measures.py`; this module is
what the registry, the command line and the model card know of the benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mdu_cli.errors import ConfigError
from mdu_cli.evaluation.benchmarks.base import BenchmarkOption, format_number

SPLIT_CHOICES = ("forget01", "forget05", "forget10")


class Tofu:
    name = "tofu"
    summary = ("tofu: TOFU's truth ratios, forget quality and model utility over forget, retain, real authors "
               "and world facts.")
    options = (
        BenchmarkOption("--split", "tofu_split", "With --benchmark tofu and no data files: which forget split of "
                        "locuslab/TOFU to fetch.", choices=SPLIT_CHOICES, default="forget10"),
        BenchmarkOption("--real-authors", "real_authors",
                        "With --benchmark tofu: the real-authors records (with perturbed answers)."),
        BenchmarkOption("--world-facts", "world_facts",
                        "With --benchmark tofu: the world-facts records (with perturbed answers)."),
        BenchmarkOption("--reference", "reference",
                        "With --benchmark tofu: the JSON report of the retain-only model, for forget quality.",
                        is_file=True),
    )

    def files(self, forget: Optional[str], retain: Optional[str], options: dict) -> dict[str, Optional[str]]:
        from mdu_cli.evaluation.benchmarks.tofu import measures

        files = {"forget": forget, "retain": retain, "real_authors": options.get("real_authors"),
                 "world_facts": options.get("world_facts")}
        return files if any(files.values()) else measures.hub_files(options.get("tofu_split") or "forget10")

    def inputs(self, options: dict) -> list[Path]:
        """Local files beside the data that the report may never replace."""
        return [Path(options["reference"])] if options.get("reference") else []

    def check(self, datasets: dict, splits: dict, options: dict, limit: Optional[int], mc_samples: int,
              seed: int) -> Optional[dict]:
        """Every split has perturbed answers; the reference report (if any)
        was made on the same forget records, masks and records count."""
        from mdu_cli.evaluation.benchmarks.tofu import measures

        for name, records in splits.items():
            measures.check_records(name, records)
        reference = options.get("reference")
        if not reference:
            return None
        if "forget" not in datasets:
            raise ConfigError("--reference compares forget truth ratios; give --forget too")
        ref = measures.read_reference(reference, datasets["forget"].sha256)
        measures.check_reference_matches(ref, len(splits["forget"]), limit, mc_samples, seed)
        return ref

    def evaluate(self, loaded, splits: dict, mc_samples: int, seed: int, generation: dict, batch_size: int,
                 show_progress: bool) -> dict:
        from mdu_cli.evaluation.benchmarks.tofu import measures

        return measures.evaluate_tofu(loaded, splits, mc_samples, seed, generation, batch_size, show_progress)

    def finish(self, report: dict, checked: Optional[dict]) -> dict:
        from mdu_cli.evaluation.benchmarks.tofu import measures

        report = {"benchmark": self.name, **report}
        report.update(measures.headline(report, checked))
        report["reference"] = {"path": checked["path"], "model": checked["model"]} if checked else None
        return report

    def format(self, report: dict) -> str:
        """The two headline numbers, then each split's aggregates."""
        from mdu_cli.diff.format import text_table

        lines = [f"forget quality  {format_number(report['forget_quality'])}"
                 + ("" if report["reference"] else "  (needs --reference: the retain-only model's report)"),
                 f"model utility   {format_number(report['model_utility'])}", ""]
        metrics = ("probability", "probability_normalised", "rouge_l", "truth_ratio_closer_to_1", "truth_score")
        rows = [[split] + [format_number(values.get(m)) for m in metrics] for split, values in report["splits"].items()]
        header = ["split", "prob.", "prob. normalised", "ROUGE-L", "TR closer to 1", "TR score (1-R)+"]
        return "\n".join(lines) + "\n" + text_table(header, rows)

    def card_lines(self, report: dict, fmt) -> list[str]:
        """The headline rows of a model card's evaluation section."""
        reference = report.get("reference") or {}
        lines = [
            "TOFU, on masked-diffusion likelihoods (per-token probabilities from the Monte Carlo estimator):",
            "",
            "| | |",
            "|---|---|",
            f"| forget quality (KS p-value against the retain-only reference) | "
            f"{fmt(report.get('forget_quality'))} |",
            f"| model utility (harmonic mean of {len(report.get('model_utility_components') or {})} values) | "
            f"{fmt(report.get('model_utility'))} |",
        ]
        if reference.get("model"):
            lines.append(f"| reference model | {reference['model']} |")
        return lines + [""]


BENCHMARK = Tofu()
