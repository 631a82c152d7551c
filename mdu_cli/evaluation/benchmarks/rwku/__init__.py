"""RWKU (`mdu eval --benchmark rwku --target NAME`): has the model forgotten a
real person, and does it still know the people around them and still work?

Forget probes at three levels (fill in the blank, question answering,
adversarial attacks by type), neighbor probes at two, membership inference on
texts about the target against texts that are not, and five utility sets,
each on the target's own rows of RWKU's files (`data.py`). The measures are
in `measures.py`, the model's side in `evaluate.py`; this module is what the
registry, the command line and the model card know of the benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mdu_cli.errors import ConfigError
from mdu_cli.evaluation.benchmarks.base import BenchmarkOption, format_number
from mdu_cli.evaluation.benchmarks.rwku.data import DEFAULT_SOURCE, PARTS

# The headline table: (key, what) in RWKU's column order and names.
TABLE = (
    ("forget FB", "fill-in-the-blank probes (level 1), ROUGE-L recall"),
    ("forget QA", "question-answer probes (level 2), ROUGE-L recall"),
    ("forget AA", "adversarial-attack probes (level 3), ROUGE-L recall"),
    ("forget All", "mean of the three forget levels"),
    ("neighbor FB", "neighbor fill-in-the-blank (level 1), ROUGE-L recall"),
    ("neighbor QA", "neighbor question-answer (level 2), ROUGE-L recall"),
    ("neighbor All", "mean of the two neighbor levels"),
    ("MIA FM", "mean LOSS score (token log-likelihood) of the forget MIA texts"),
    ("MIA RM", "mean LOSS score of the retain MIA texts"),
    ("MIA AUC", "forget-vs-retain AUC of the LOSS score"),
    ("Gen", "general: MMLU-style accuracy"),
    ("Rea", "reasoning: BBH exact match"),
    ("Tru", "truthfulness: TruthfulQA MC1"),
    ("Fac", "factuality: TriviaQA token F1 (paper preset: answer contained)"),
    ("Flu", "fluency: weighted 2/3-gram entropy of instruction answers"),
)


TOO_LONG = ("leave that --part out, or give a shorter --max-new-tokens (RWKU's prompts are fixed; a model "
            "with more positions takes them)")


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def table(parts: dict) -> dict[str, Optional[float]]:
    """The headline numbers of one model's part reports."""
    out: dict[str, Optional[float]] = {}
    forget, neighbor, mia, utility = (parts.get(p) for p in PARTS)
    if forget:
        levels = [forget.get(f"level_{n}_rouge_l_r") for n in (1, 2, 3)]
        out.update(zip(("forget FB", "forget QA", "forget AA"), levels))
        out["forget All"] = _mean(levels)
    if neighbor:
        levels = [neighbor.get(f"level_{n}_rouge_l_r") for n in (1, 2)]
        out.update(zip(("neighbor FB", "neighbor QA"), levels))
        out["neighbor All"] = _mean(levels)
    if mia:
        out["MIA FM"], out["MIA RM"] = mia["forget_mia"]["loss"], mia["retain_mia"]["loss"]
        out["MIA AUC"] = mia["auc"]["loss"]
    if utility:
        factuality = utility["factuality"]
        out.update({"Gen": utility["general"]["acc"], "Rea": utility["reasoning"]["EM"],
                    "Tru": utility["truthfulness"]["MC1"],
                    "Fac": factuality["F1"] if "F1" in factuality else factuality["match"],
                    "Flu": utility["fluency"]["entropy"]})
    return out


class Rwku:
    name = "rwku"
    summary = ("rwku: RWKU's forget probes (levels 1-3), neighbor probes, membership inference and utility "
               "for one --target.")
    takes_base = True
    card_table_only = True
    own_generation = True   # each part has its own length; --max-new-tokens etc. override all parts
    options = (
        BenchmarkOption("--target", "target", "With --benchmark rwku: the person to evaluate forgetting of, as RWKU "
                        "names them (e.g. 'Stephen King')."),
        BenchmarkOption("--rwku", "rwku", "With --benchmark rwku: RWKU's files, as hf://datasets/OWNER/NAME"
                        "[@REVISION] or a local directory holding All/*.json.", default=DEFAULT_SOURCE),
        BenchmarkOption("--part", "parts", "With --benchmark rwku: which parts to run (repeatable).  [default: all]",
                        choices=PARTS, multiple=True),
    )

    def files(self, forget: Optional[str], retain: Optional[str], options: dict) -> dict[str, Optional[str]]:
        if forget or retain:
            raise ConfigError("--benchmark rwku reads RWKU's own files (--rwku); --forget and --retain do not apply")
        return {}

    def read(self, options: dict, limit: Optional[int]):
        """The target's rows of every set the parts need, checked: (files, sets, data)."""
        from mdu_cli.evaluation.benchmarks.rwku.data import read_target

        target = options.get("target")
        if not target:
            raise ConfigError("--benchmark rwku needs --target NAME (the person, as RWKU names them)")
        parts = tuple(p for p in PARTS if p in (options.get("parts") or PARTS))
        data = read_target(options.get("rwku") or DEFAULT_SOURCE, target, parts, limit)
        return data.files, data.sets, data

    def inputs(self, options: dict) -> list[Path]:
        return []

    def check(self, datasets: dict, splits: dict, options: dict, limit: Optional[int], mc_samples: int,
              seed: int):
        return None

    def resolve_generation(self, requested: dict, family: str) -> dict:
        from mdu_cli.evaluation.benchmarks.rwku.settings import resolve

        if requested.get("max_new_tokens") == 0:
            raise ConfigError("--max-new-tokens 0 would skip every answer RWKU scores; leave it out (each part has "
                              "its own length) or give a length")
        return resolve(requested, family)

    def check_lengths(self, loaded, splits: dict, generation: dict) -> None:
        """Every prompt with what follows it (its part's new tokens, a choice
        letter's one position, the longest TruthfulQA answer), and every MIA
        text, within the model's positions."""
        from mdu_cli.data.tokenization import encode_text
        from mdu_cli.evaluation.benchmarks.rwku.evaluate import part_prompts
        from mdu_cli.evaluation.benchmarks.rwku.settings import part_settings

        paper = generation.get("preset") == "paper"

        def following(name: str, row: dict) -> tuple[int, str]:
            if name == "truthfulness":
                choices = row["mc1_targets"]["choices"] + row["mc2_targets"]["choices"]
                return max(len(encode_text(loaded.tokenizer, " " + c)) for c in choices), "its longest answer"
            if name == "general" and not paper:
                return 1, "the answer's one position"
            part = "forget" if name.startswith(("forget_level", "neighbor_level")) else name
            tokens = part_settings(generation, part)["max_new_tokens"]
            return tokens, f"{tokens} new tokens"

        for name, prompts in part_prompts(loaded, splits, paper).items():
            for row, (item, ids) in enumerate(zip(splits[name], prompts), start=1):
                tokens, what = following(name, item)
                loaded.check_length(len(ids) + tokens, f"RWKU {name} row {row} of the target",
                                    f"the prompt with {what}", fix=TOO_LONG)
        for name in ("forget_mia", "retain_mia"):
            for row, item in enumerate(splits.get(name, ()), start=1):
                loaded.check_length(len(encode_text(loaded.tokenizer, item["text"])) + 1,
                                    f"RWKU {name} row {row} of the target", "the text", fix=TOO_LONG)

    def evaluate(self, loaded, splits: dict, mc_samples: int, seed: int, generation: dict, batch_size: int,
                 show_progress: bool) -> dict:
        from mdu_cli.evaluation.benchmarks.rwku.evaluate import evaluate_rwku

        return evaluate_rwku(loaded, splits, generation, mc_samples, seed, batch_size, show_progress)

    def finish(self, report: dict, checked) -> dict:
        return {"benchmark": self.name, "target": checked.target, "rwku": checked.source, **report,
                "table": table(report["splits"])}

    def with_base(self, report: dict, base_splits: dict) -> dict:
        base_table = table(base_splits)
        report["base"]["table"] = base_table
        report["change"] = {key: (value - base_table[key] if value is not None and base_table.get(key) is not None
                                  else None) for key, value in report["table"].items()}
        return report

    def format(self, report: dict) -> str:
        from mdu_cli.diff.format import text_table

        base = (report.get("base") or {}).get("table")
        header = ["RWKU", "base", "model", "change"] if base else ["RWKU", "model"]
        rows = []
        for key, _ in TABLE:
            if key not in report["table"]:
                continue
            value = report["table"][key]
            if base:
                change = report["change"].get(key)
                rows.append([key, format_number(base.get(key)), format_number(value),
                             "-" if change is None else f"{change:+.4g}"])
            else:
                rows.append([key, format_number(value)])
        lines = [f"RWKU target {report['target']!r}" + (" (paper preset)" if report["generation"].get("preset")
                                                         else ""), text_table(header, rows)]
        forget = report["splits"].get("forget") or {}
        if forget.get("level_3_by_type"):
            lines += ["", "level 3 by attack type: " + ", ".join(
                f"{kind} {format_number(value)}" for kind, value in forget["level_3_by_type"].items())]
        return "\n".join(lines)

    def card_lines(self, report: dict, fmt) -> list[str]:
        """The RWKU table of a model card. The target's name stays out: a card
        says what was measured, not whom the model was made to forget."""
        base = (report.get("base") or {}).get("table")
        lines = ["RWKU (one target; ROUGE-L recall of greedy answers, masked-diffusion likelihoods for MIA and "
                 "multiple choice" + ("; the MDU paper's preset" if report.get("generation", {}).get("preset") else "")
                 + "):", "", "| measure | " + ("base | " if base else "") + "model |",
                 "|---|" + ("---|" if base else "") + "---|"]
        for key, what in TABLE:
            if key in (report.get("table") or {}):
                lines.append(f"| {key} ({what}) | " + (f"{fmt(base.get(key))} | " if base else "")
                             + f"{fmt(report['table'][key])} |")
        return lines + [""]


BENCHMARK = Rwku()
