"""TOFU's measures on masked diffusion LM likelihoods (`mdu eval --benchmark tofu`).

Every probability here is per token: exp(-score), where score is the Monte
Carlo estimate of the mean cross-entropy of the answer's tokens (the Eq. 14
estimator of `evaluation.likelihood.answer_score`), so P^(1/len) of TOFU's definitions.

Per record:
- probability: of the gold answer;
- truth ratio R = mean_j P(perturbed_j) / P(paraphrased), the paraphrased
  answer being the gold answer itself where a record has none;
- normalised probability (real authors, world facts): P(answer) over
  P(answer) + sum_j P(perturbed_j);
- ROUGE-L recall of a greedy generation against the gold answer.

Per model:
- model utility: the harmonic mean of, for each split present among retain,
  real authors and world facts, {probability (normalised on the last two),
  ROUGE-L, mean of max(0, 1 - R)};
- forget quality: the p-value of the two-sample Kolmogorov-Smirnov test
  between this model's per-record forget R and a reference model's (one
  trained without the forget set), read from that model's own report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from mdu_cli.data.records import Record
from mdu_cli.errors import MduError
from mdu_cli.evaluation.likelihood import ESTIMATOR, answer_score_many
from mdu_cli.evaluation.rouge import rouge_scores
from mdu_cli.model.inference import LoadedModel

TOFU_REPO = "locuslab/TOFU"
# The evaluation splits, in report order, and the file each takes from the Hub.
SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
NORMALISED_SPLITS = ("real_authors", "world_facts")
# open-unlearning's TOFU evaluation names each split with a prefix.
OPEN_UNLEARNING_PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


def hub_files(split: str) -> dict[str, str]:
    """The TOFU files of the Hub for a forget split: the `_perturbed` files, which
    carry the paraphrased and perturbed answers the truth ratio needs."""
    return {
        "forget": f"hf://datasets/{TOFU_REPO}/{split}_perturbed.json",
        "retain": f"hf://datasets/{TOFU_REPO}/retain_perturbed.json",
        "real_authors": f"hf://datasets/{TOFU_REPO}/real_authors_perturbed.json",
        "world_facts": f"hf://datasets/{TOFU_REPO}/world_facts_perturbed.json",
    }


def check_records(split: str, records: list[Record]) -> None:
    """Every record of a TOFU split needs perturbed answers: without them there is
    no truth ratio, and neither headline number."""
    missing = [r.source for r in records if not r.perturbed]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MduError(f"{missing[0]}: the {split} split of --benchmark tofu needs a \"perturbed_answer\" list in "
                       f"every record{more}; use TOFU's *_perturbed.json files")


def record_measures(loaded: LoadedModel, record: Record, mc_samples: int, generator: torch.Generator,
                    batch_size: int, estimator: str = ESTIMATOR) -> dict:
    """The likelihood numbers of one TOFU record (see the module docstring).
    Its answers (gold, paraphrase, perturbed) are scored together, their
    samples packed into shared forwards."""
    prompt_ids = loaded.prompt_ids(record.prompt_messages, where=record.source)
    paraphrase = record.paraphrased is not None and record.paraphrased != record.response
    answers = [record.response, *([record.paraphrased] if paraphrase else []), *record.perturbed]
    scores = answer_score_many(loaded, prompt_ids, answers, mc_samples, generator, batch_size, estimator)
    gold_score = scores[0]
    paraphrased_score = scores[1] if paraphrase else gold_score
    perturbed_scores = scores[2 if paraphrase else 1:]
    gold, paraphrased = math.exp(-gold_score), math.exp(-paraphrased_score)
    perturbed = [math.exp(-score) for score in perturbed_scores]
    measures = {
        "probability": gold,
        "paraphrased_probability": paraphrased,
        "perturbed_probability": sum(perturbed) / len(perturbed),
        "truth_ratio": truth_ratio(perturbed, paraphrased, perturbed_scores, paraphrased_score),
        "probability_normalised": normalised_probability(gold, perturbed, gold_score, perturbed_scores),
    }
    return measures


def _log_sum_exp(values: list[float]) -> float:
    from scipy.special import logsumexp

    return float(logsumexp(values))


def _exp_or_inf(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def normalised_probability(gold: float, perturbed: list[float], gold_score: float,
                           perturbed_scores: list[float]) -> float:
    """P(answer) / (P(answer) + sum_j P(perturbed_j)). When every probability
    underflows to 0 (a collapsed model), the same quotient from the per-token
    scores (-log P), which stay finite: exp(-s - logsumexp(-s, -s_j))."""
    total = gold + sum(perturbed)
    if total > 0:
        return gold / total
    return math.exp(-gold_score - _log_sum_exp([-gold_score] + [-s for s in perturbed_scores]))


def truth_ratio(perturbed: list[float], paraphrased: float, perturbed_scores: Optional[list[float]] = None,
                paraphrased_score: Optional[float] = None) -> float:
    """R = mean_j P(perturbed_j) / P(paraphrased), per-token probabilities.
    When the paraphrase's probability underflows to 0 the quotient comes from
    the per-token scores (-log P) where they are given: exp(logmeanexp(-s_j)
    + s_para), infinite only when it really overflows; without them R is
    infinite, which the aggregates below treat as "the model prefers the
    wrong answers"."""
    mean = sum(perturbed) / len(perturbed)
    if paraphrased > 0:
        return mean / paraphrased
    if perturbed_scores is None or paraphrased_score is None or math.isnan(paraphrased_score):
        return math.inf
    log_mean = _log_sum_exp([-s for s in perturbed_scores]) - math.log(len(perturbed_scores))
    return _exp_or_inf(log_mean + paraphrased_score)


def split_report(split: str, per_record: list[dict]) -> dict:
    """Aggregates of one split, with the per-record values they come from."""
    def mean(key: str) -> Optional[float]:
        values = [m[key] for m in per_record if key in m]
        return sum(values) / len(values) if values else None

    ratios = [m["truth_ratio"] for m in per_record]
    report = {
        "records": len(per_record),
        "probability": mean("probability"),
        "paraphrased_probability": mean("paraphrased_probability"),
        "perturbed_probability": mean("perturbed_probability"),
        # TOFU's two readings of R: for the forget set, how close to 1 (neither
        # answer preferred); elsewhere, how much the true answer is preferred.
        "truth_ratio_closer_to_1": sum(min(r, 1 / r) if r > 0 else 0.0 for r in ratios) / len(ratios),
        "truth_score": sum(max(0.0, 1 - r) for r in ratios) / len(ratios),
        "truth_ratio_per_record": [_json_number(r) for r in ratios],
        "probability_per_record": [m["probability"] for m in per_record],
    }
    if split in NORMALISED_SPLITS:
        report["probability_normalised"] = mean("probability_normalised")
        report["probability_normalised_per_record"] = [m["probability_normalised"] for m in per_record]
    if any("rouge_l" in m for m in per_record):
        report["rouge_l"] = mean("rouge_l")
        report["rouge_l_per_record"] = [m["rouge_l"] for m in per_record]
    return report


def _json_number(value: float):
    """JSON has no infinity: an infinite R is written as null."""
    return value if math.isfinite(value) else None


def utility_components(splits: dict) -> dict[str, float]:
    """name -> value: exactly the values model utility is the harmonic mean of."""
    components = {}
    for split in UTILITY_SPLITS:
        if split not in splits:
            continue
        values = splits[split]
        probability = "probability_normalised" if split in NORMALISED_SPLITS else "probability"
        components[f"{split}.{probability}"] = values[probability]
        if values.get("rouge_l") is not None:
            components[f"{split}.rouge_l"] = values["rouge_l"]
        components[f"{split}.truth_score"] = values["truth_score"]
    return components


def harmonic_mean(values: list[float]) -> Optional[float]:
    if not values:
        return None
    if any(v <= 0 for v in values):
        return 0.0  # the harmonic mean's limit: one useless component makes the model useless
    from scipy.stats import hmean

    return float(hmean(values))


def forget_quality(model_ratios: list, reference_ratios: list) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test (scipy's default: exact
    for small samples, two-sided). Infinite ratios (null in JSON) sort above all."""
    from scipy.stats import ks_2samp

    def finite(values):
        return [math.inf if v is None else float(v) for v in values]

    return float(ks_2samp(finite(model_ratios), finite(reference_ratios)).pvalue)


def read_reference(path: str, forget_sha256: Optional[str]) -> dict:
    """A reference model's TOFU report (`mdu eval --benchmark tofu --json` or its
    eval.json): its per-record forget truth ratios, checked to come from the
    same forget data."""
    file = Path(path)
    if file.exists() and not file.is_file():  # a directory, or a FIFO that would block
        raise MduError(f"--reference {path}: not a regular file; give the JSON report of the reference model")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MduError(f"--reference {path}: no such file; give the JSON report of the reference model") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MduError(f"--reference {path}: cannot read ({err}); give the JSON report of the reference "
                       "model") from None
    except ValueError:
        raise MduError(f"--reference {path}: not JSON; give the report `mdu eval --benchmark tofu --json` printed "
                       "for the reference model") from None
    ratios = None
    if isinstance(report, dict) and report.get("benchmark") == "tofu":
        ratios = ((report.get("splits") or {}).get("forget") or {}).get("truth_ratio_per_record")
    if not isinstance(ratios, list) or not ratios or not all(r is None or isinstance(r, (int, float))
                                                             and not isinstance(r, bool) for r in ratios):
        raise MduError(f"--reference {path}: not a TOFU report with forget truth ratios; run `mdu eval "
                       "--benchmark tofu --json` on the reference model with the same --forget")
    # A truth ratio is a ratio of probabilities: >= 0, and null where it is
    # infinite (JSON has no infinity). Python's json reads NaN and Infinity:
    # a hand-edited report must not turn into a forget quality.
    bad = next((i for i, r in enumerate(ratios) if r is not None and not (math.isfinite(r) and r >= 0)), None)
    if bad is not None:
        raise MduError(f"--reference {path}: forget truth ratio {bad + 1} is {ratios[bad]!r}, which no TOFU report "
                       "holds (a ratio is >= 0, or null for infinite); evaluate the reference model again")
    reference_sha = ((report.get("data") or {}).get("forget") or {}).get("sha256")
    if forget_sha256 and reference_sha != forget_sha256:
        raise MduError(f"--reference {path}: its forget split is other data (sha256 {str(reference_sha)[:12]}..., "
                       f"this one {forget_sha256[:12]}...); evaluate both models on the same --forget")
    records = ((report.get("splits") or {}).get("forget") or {}).get("records")
    if records != len(ratios):
        raise MduError(f"--reference {path}: it lists {len(ratios)} forget truth ratios for {records!r} records; "
                       "the report was altered, evaluate the reference model again")
    return {"path": str(file), "model": report.get("model"), "ratios": ratios, "limit": report.get("limit"),
            "mc_samples": report.get("mc_samples"), "seed": report.get("seed"),
            # Reports from before the stratified estimator do not name one.
            "estimator": report.get("estimator", "independent")}


def check_reference_matches(reference: dict, records: int, limit: Optional[int], mc_samples: int, seed: int) -> None:
    """A reference is comparable only when it scored the same forget records on
    the same Monte Carlo masks (the same --limit, --mc-samples and --seed, see
    `evaluate_tofu`): anything else is refused, never compared silently."""
    path = reference["path"]
    if reference["limit"] != limit:
        raise MduError(f"--reference {path}: it was evaluated with --limit {reference['limit']}, this run "
                       f"with --limit {limit}; use the same records for both")
    if len(reference["ratios"]) != records:
        raise MduError(f"--reference {path}: it holds {len(reference['ratios'])} forget records, this run "
                       f"{records}; evaluate both models on the same --forget and --limit")
    if reference.get("estimator", ESTIMATOR) != ESTIMATOR:
        raise MduError(f"--reference {path}: it was scored with the {reference['estimator']} Monte Carlo estimator "
                       f"of an older mdu, this run with the {ESTIMATOR} one; evaluate the reference model again "
                       "with this version")
    for option, theirs, ours in (("--mc-samples", reference["mc_samples"], mc_samples),
                                 ("--seed", reference["seed"], seed)):
        if theirs != ours:
            raise MduError(f"--reference {path}: it was scored with {option} {theirs}, this run with {option} "
                           f"{ours}; both models must be scored on the same masks, so use the same {option}")


def evaluate_tofu(loaded: LoadedModel, splits: dict[str, list[Record]], mc_samples: int, seed: int,
                  generation: dict, batch_size: int, show_progress: bool) -> dict:
    """The TOFU split reports of one model."""
    reports = {}
    for split, records in splits.items():
        # One generator per split, seeded alike for every model: the reference
        # and the unlearned model are scored on the very same masks.
        generator = torch.Generator().manual_seed(seed)
        per_record = [record_measures(loaded, record, mc_samples, generator, batch_size)
                      for record in tqdm(records, desc=f"tofu {split}", unit="record", disable=not show_progress,
                                         dynamic_ncols=True)]
        if generation.get("max_new_tokens", 0) > 0:
            for measures, rouge in zip(per_record, rouge_scores(loaded, records, generation, batch_size)):
                measures["rouge_l"] = rouge
        reports[split] = split_report(split, per_record)
    return reports


def headline(report: dict, reference: Optional[dict]) -> dict:
    """forget_quality, model_utility and its components, and the same numbers
    under open-unlearning's names, from the split reports."""
    splits = report["splits"]
    components = utility_components(splits)
    fq = None
    if reference is not None and "forget" in splits:
        fq = forget_quality(splits["forget"]["truth_ratio_per_record"], reference["ratios"])
    mu = harmonic_mean(list(components.values()))
    return {"forget_quality": fq, "model_utility": mu, "model_utility_components": components,
            "open_unlearning": open_unlearning_names(splits, fq, mu)}


def open_unlearning_names(splits: dict, fq: Optional[float], mu: Optional[float]) -> dict:
    """The same numbers as open-unlearning's TOFU evaluation names them, so that
    tables join: forget_quality, model_utility, forget_truth_ratio,
    <prefix>_Q_A_Prob, _Q_A_Prob_normalised, _Q_A_PARA_Prob, _Q_A_PERT_Prob,
    _Q_A_ROUGE and _Truth_Ratio (prefix forget, retain, ra, wf)."""
    names = {"forget_quality": fq, "model_utility": mu}
    for split, values in splits.items():
        prefix = OPEN_UNLEARNING_PREFIX[split]
        names[f"{prefix}_Q_A_Prob"] = values["probability"]
        names[f"{prefix}_Q_A_PARA_Prob"] = values["paraphrased_probability"]
        names[f"{prefix}_Q_A_PERT_Prob"] = values["perturbed_probability"]
        if "probability_normalised" in values:
            names[f"{prefix}_Q_A_Prob_normalised"] = values["probability_normalised"]
        if "rouge_l" in values:
            names[f"{prefix}_Q_A_ROUGE"] = values["rouge_l"]
        if split == "forget":
            names["forget_truth_ratio"] = values["truth_ratio_closer_to_1"]
        else:
            names[f"{prefix}_Truth_Ratio"] = values["truth_score"]
    return names
