"""RWKU's evaluation of one model on one target's rows (`mdu eval --benchmark rwku`).

The prompts are RWKU's own (its repository's LLaMA-Factory/src/llmtuner/eval/):
each probe wrapped in an instruction, the chat template, then "Answer:"; the
MDU paper's preset puts the raw query in the user turn instead. Generation is
greedy with the masked-diffusion sampler, every probe of a part in batched
passes; where RWKU reads an autoregressive likelihood, the masked-diffusion
one is used (docs/method.md section 4): per-token log-likelihoods for the MIA
scores, one masked position for a single-token choice (exact), the ELBO
L x mean cross-entropy for a multi-token answer (TruthfulQA).
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from mdu_cli.data.tokenization import encode_text
from mdu_cli.evaluation.benchmarks.rwku import measures
from mdu_cli.evaluation.benchmarks.rwku.prompts import (
    TRIVIAQA_FEW_SHOT,
    TRUTHFULQA_PRIMER,
    mmlu_prompt,
    probe_prompt,
)
from mdu_cli.evaluation.likelihood import (
    answer_score,
    covering_masks,
    next_token_log_probs,
    token_log_likelihoods,
)
from mdu_cli.model.inference import LoadedModel
from mdu_cli.model.sampling import generate

PROBE_FIELDS = ("query", "answer", "level", "type", "subject")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Prompts:
    """Token ids of RWKU's prompts: the chat template around the user turn,
    then RWKU's assistant-side text ("Answer:", "A:")."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def __call__(self, user: str, after: str = "", where: str = "") -> list[int]:
        ids = self.loaded.prompt_ids([{"role": "user", "content": user}], where=where)
        return ids + encode_text(self.loaded.tokenizer, after) if after else ids


def part_prompts(loaded: LoadedModel, sets: dict, paper: bool) -> dict[str, list[list[int]]]:
    """Every prompt the evaluation will give the model, per set, so that
    lengths are checked before any weights load and built once."""
    prompt = Prompts(loaded)
    out: dict[str, list[list[int]]] = {}
    for name, rows in sets.items():
        if name.startswith(("forget_level", "neighbor_level")):
            out[name] = [prompt(*probe_prompt(row, paper), where=name) for row in rows]
        elif name == "general":
            out[name] = [prompt(mmlu_prompt(row), "Answer:", where=name) for row in rows]
        elif name == "reasoning":
            out[name] = [prompt(row["cot"].strip() + "\n\nFollowing previous examples, answer the following "
                                "questions and end with 'so the answer is'\nQ: " + row["question"], "A:", where=name)
                         for row in rows]
        elif name == "truthfulness":
            out[name] = [prompt(TRUTHFULQA_PRIMER + "\n\nQ: " + row["question"], "A:", where=name) for row in rows]
        elif name == "factuality":
            out[name] = [prompt(TRIVIAQA_FEW_SHOT + f"Q: {row['question']}\n", "A:", where=name) for row in rows]
        elif name == "fluency":
            out[name] = [prompt(f"Instruction: {row['instruction']}\n", where=name) for row in rows]
    return out


def _generate(loaded: LoadedModel, prompts: list[list[int]], settings: dict, batch_size: int,
              desc: str, show_progress: bool) -> list[str]:
    """Greedy completions of every prompt, `batch_size` rows per pass."""
    texts = []
    with tqdm(total=len(prompts), desc=desc, unit="probe", disable=not show_progress, dynamic_ncols=True) as bar:
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first:first + batch_size]
            outputs = generate(loaded.model, loaded.family, loaded.mask_token_id, chunk, pad_id=loaded.pad_id,
                               stop_ids=loaded.stop_ids(), **settings)
            texts += [loaded.tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
            bar.update(len(chunk))
    return texts


def _first_line(text: str) -> str:
    """RWKU stops a probe's answer at a newline; empty is NOANSWER."""
    line = text.split("\n", 1)[0].strip()
    return line or measures.NO_ANSWER


def _levels(results: list[dict], names: list[str]) -> dict:
    report = {}
    for name in names:
        scores = [r["rouge_l_r"] for r in results if r["set"] == name]
        report[f"level_{name[-1]}_rouge_l_r"] = measures.mean(scores)
    return report


def probe_part(loaded, sets, prompts, names, settings, paper, batch_size, show_progress, part) -> dict:
    """Forget or neighbor probes: every level's probes in one run of batched
    passes, each answer's ROUGE-L recall, the mean per level (and per attack
    type at level 3)."""
    rouge = measures.paper_rouge_l_recall if paper else measures.rouge_l_recall
    names = [n for n in names if n in sets]
    flat = [(name, row, ids) for name in names for row, ids in zip(sets[name], prompts[name])]
    outputs = _generate(loaded, [ids for _, _, ids in flat], settings, batch_size, f"rwku {part}", show_progress)
    results = []
    for (name, row, _), output in zip(flat, outputs):
        prediction = _first_line(output)
        # As RWKU's own output keeps a probe: its fields, the prediction, the score.
        results.append({"set": name, **{k: row[k] for k in PROBE_FIELDS if k in row}, "prediction": prediction,
                        "rouge_l_r": rouge(prediction, row["answer"])})
    report = _levels(results, names)
    if "forget_level3" in names:
        by_type: dict[str, list[float]] = {}
        for r in results:
            if r["set"] == "forget_level3":
                by_type.setdefault(r.get("type", "?"), []).append(r["rouge_l_r"])
        report["level_3_by_type"] = {t: measures.mean(v) for t, v in sorted(by_type.items())}
    report["results"] = results
    return report


def mia_part(loaded, sets, mc_samples, seed, batch_size, show_progress) -> dict:
    """The four scores of every MIA text, their means per set, and the
    forget-vs-retain AUC of each score."""
    tokenizer = loaded.tokenizer
    start = tokenizer.bos_token_id
    if start is None and loaded.family.shifted_logits:
        start = tokenizer.eos_token_id  # a shifted model predicts token 0 from a token before it
    prefix = [start] if start is not None else []
    report = {}
    for name in ("forget_mia", "retain_mia"):
        generator = torch.Generator().manual_seed(seed)
        results = []
        for row in tqdm(sets[name], desc=f"rwku {name}", unit="text", disable=not show_progress,
                        dynamic_ncols=True):
            ids = encode_text(tokenizer, row["text"])
            if not ids:
                continue
            loss, ll, normalised = token_log_likelihoods(loaded, prefix, ids,
                                                         covering_masks(len(ids), mc_samples, generator),
                                                         batch_size, bound_masks=mc_samples)
            results.append({"subject": row["subject"], **measures.mia_scores(row["text"], loss, ll, normalised)})
        report[name] = {score: measures.mean([r[score] for r in results]) for score in ("loss", "zlib", "mink",
                                                                                      "mink++")}
        report[name]["results"] = results
    report["auc"] = {score: measures.auc([r[score] for r in report["forget_mia"]["results"]],
                                         [r[score] for r in report["retain_mia"]["results"]])
                     for score in ("loss", "zlib", "mink", "mink++")}
    return report


def _letter_candidates(loaded: LoadedModel, count: int) -> list[int]:
    """The token of " A", " B", ...: the last one " X" encodes to, as RWKU reads them."""
    return [encode_text(loaded.tokenizer, " " + letter)[-1] for letter in LETTERS[:count]]


def general(loaded, rows, prompts, settings, paper, batch_size, show_progress) -> dict:
    """MMLU-style accuracy: RWKU's is the most likely of the choice letters at
    the one position after "Answer:"; the paper preset's, the first letter the
    model generates, on the first 100 rows."""
    if paper:
        rows, prompts = rows[:100], prompts[:100]
        outputs = _generate(loaded, prompts, settings, batch_size, "rwku general", show_progress)
        predictions = [measures.first_letter(text, len(row["choices"])) for text, row in zip(outputs, rows)]
    else:
        predictions, outputs = [None] * len(rows), [None] * len(rows)
        # Rows are grouped by their number of choices: each group's candidates are its letters.
        for count in sorted({len(row["choices"]) for row in rows}):
            index = [i for i, row in enumerate(rows) if len(row["choices"]) == count]
            scores = next_token_log_probs(loaded, [prompts[i] for i in index], _letter_candidates(loaded, count),
                                          batch_size)
            for i, values in zip(index, scores):
                predictions[i] = max(range(count), key=values.__getitem__)
    results = [{"question": row["question"], "answer": row["answer"], "subject": row["subject"],
                "prediction": prediction, "correct": float(prediction == row["answer"]),
                **({"output": output} if output is not None else {})}
               for row, prediction, output in zip(rows, predictions, outputs)]
    return {"acc": measures.mean([r["correct"] for r in results]), "results": results}


def reasoning(loaded, rows, prompts, settings, batch_size, show_progress) -> dict:
    outputs = _generate(loaded, prompts, settings, batch_size, "rwku reasoning", show_progress)
    results = []
    for row, output in zip(rows, outputs):
        prediction = measures.bbh_prediction(output)
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        results.append({"question": row["question"], "answer": row["answer"], "subject": row["subject"],
                        "raw_output": output, "prediction": prediction,
                        "em": measures.exact_match(prediction, answers)})
    return {"EM": measures.mean([r["em"] for r in results]), "results": results}


def truthfulness(loaded, rows, prompts, mc_samples, seed, batch_size, show_progress) -> dict:
    """MC1 and MC2 from each answer's log-likelihood after the prompt
    (RWKU's sum of token log-probabilities; here the masked-diffusion ELBO,
    the answer's length times its Monte Carlo mean log-probability)."""
    results = []
    for index, (row, prompt) in enumerate(tqdm(list(zip(rows, prompts)), desc="rwku truthfulness",
                                               unit="question", disable=not show_progress, dynamic_ncols=True)):
        cache: dict[str, float] = {}

        def log_likelihood(choice: str) -> float:
            if choice not in cache:
                # RWKU scores " " + choice after a prompt that ends in "A:". Every
                # choice of a question draws its masks from the same seed (common
                # random numbers): the comparison cancels most of the noise.
                answer = " " + choice
                length = len(encode_text(loaded.tokenizer, answer))
                generator = torch.Generator().manual_seed(seed + index)
                cache[choice] = -length * answer_score(loaded, prompt, answer, mc_samples, generator, batch_size)
            return cache[choice]

        grouped = {}
        for key in ("mc1_targets", "mc2_targets"):
            targets = row[key]
            grouped[key] = {"true": [log_likelihood(c) for c, label in zip(targets["choices"], targets["labels"])
                                     if label == 1],
                            "false": [log_likelihood(c) for c, label in zip(targets["choices"], targets["labels"])
                                      if label == 0]}
        mc1, mc2 = measures.truthful_mc(grouped["mc1_targets"], grouped["mc2_targets"])
        results.append({"question": row["question"], "subject": row["subject"], "MC1": mc1, "MC2": mc2,
                        "scores": grouped})
    return {"MC1": measures.mean([r["MC1"] for r in results]), "MC2": measures.mean([r["MC2"] for r in results]),
            "results": results}


def factuality(loaded, rows, prompts, settings, paper, batch_size, show_progress) -> dict:
    outputs = _generate(loaded, prompts, settings, batch_size, "rwku factuality", show_progress)
    results = []
    for row, output in zip(rows, outputs):
        result = {"question": row["question"], "answers": row["answers"], "subject": row["subject"],
                  "prediction": output}
        if paper:
            result["match"] = measures.contains_answer(output, row["answers"])
        else:
            result["em"], result["f1"] = (measures.exact_match(output, row["answers"]),
                                          measures.token_f1(output, row["answers"]))
        results.append(result)
    if paper:
        return {"match": measures.mean([r["match"] for r in results]), "results": results}
    return {"EM": measures.mean([r["em"] for r in results]), "F1": measures.mean([r["f1"] for r in results]),
            "results": results}


def fluency(loaded, rows, prompts, settings, batch_size, show_progress) -> dict:
    outputs = _generate(loaded, prompts, settings, batch_size, "rwku fluency", show_progress)
    results = [{"instruction": row["instruction"], "subject": row["subject"], "prediction": output,
                "entropy": measures.ngram_entropy(output)} for row, output in zip(rows, outputs)]
    return {"entropy": measures.mean([r["entropy"] for r in results]), "results": results}


def evaluate_rwku(loaded: LoadedModel, sets: dict, generation: dict, mc_samples: int, seed: int, batch_size: int,
                  show_progress: bool) -> dict:
    """Every part whose sets were read, as RWKU's output files hold them."""
    from mdu_cli.evaluation.benchmarks.rwku.settings import part_settings

    paper = generation.get("preset") == "paper"
    prompts = part_prompts(loaded, sets, paper)
    report: dict = {}
    if any(n in sets for n in ("forget_level1", "forget_level2", "forget_level3")):
        report["forget"] = probe_part(loaded, sets, prompts, ["forget_level1", "forget_level2", "forget_level3"],
                                      part_settings(generation, "forget"), paper, batch_size, show_progress,
                                      "forget")
    if any(n in sets for n in ("neighbor_level1", "neighbor_level2")):
        report["neighbor"] = probe_part(loaded, sets, prompts, ["neighbor_level1", "neighbor_level2"],
                                        part_settings(generation, "neighbor"), paper, batch_size, show_progress,
                                        "neighbor")
    if "forget_mia" in sets:
        report["mia"] = mia_part(loaded, sets, mc_samples, seed, batch_size, show_progress)
    if "general" in sets:
        report["utility"] = {
            "general": general(loaded, sets["general"], prompts["general"], part_settings(generation, "general"),
                               paper, batch_size, show_progress),
            "reasoning": reasoning(loaded, sets["reasoning"], prompts["reasoning"],
                                   part_settings(generation, "reasoning"), batch_size, show_progress),
            "truthfulness": truthfulness(loaded, sets["truthfulness"], prompts["truthfulness"], mc_samples, seed,
                                         batch_size, show_progress),
            "factuality": factuality(loaded, sets["factuality"], prompts["factuality"],
                                     part_settings(generation, "factuality"), paper, batch_size, show_progress),
            "fluency": fluency(loaded, sets["fluency"], prompts["fluency"], part_settings(generation, "fluency"),
                               batch_size, show_progress),
        }
    return report


def longest_prompt(prompts: dict[str, list[list[int]]]) -> Optional[tuple[str, int]]:
    best = None
    for name, items in prompts.items():
        for i, ids in enumerate(items):
            if best is None or len(ids) > best[1]:
                best = (f"{name} row {i + 1}", len(ids))
    return best

