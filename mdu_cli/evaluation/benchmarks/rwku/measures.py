"""RWKU's measures, as its own evaluation computes them (docs/eval.md), on
numbers the model has already produced: no torch, no model here.

- ROUGE-L recall of a prediction against the probe's answer, by the `rouge`
  package (RWKU's choice: sentences split at '.', whitespace tokens, summary-
  level LCS); the paper preset uses rouge-score's (lower case, Porter stems).
- Exact match and token F1 after SQuAD-style normalisation (lower case, no
  punctuation, no articles), the best over the gold answers.
- MIA scores of one text from its per-token log-likelihoods: LOSS (their mean),
  Zlib (LOSS over the zlib-compressed length in bytes), Min-K% and Min-K%++
  (the mean of the lowest k = 20% of the raw, resp. normalised, values).
- AUC of a score telling forget texts (members) from retain texts.
- TruthfulQA's MC1 and MC2 from answer log-likelihoods.
- Fluency: the weighted 2- and 3-gram entropy of a generation.
"""

from __future__ import annotations

import math
import re
import string
import zlib
from collections import Counter
from typing import Optional, Sequence

NO_ANSWER = "NOANSWER"   # what RWKU scores in place of an empty generation
MIN_K = 0.2
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def rouge_l_recall(prediction: str, answer: str) -> float:
    """ROUGE-L recall as the `rouge` package's Rouge().get_scores gives it. A
    prediction with no word once the package splits it (say, '.') has nothing
    in common with the answer: 0, where the package would raise."""
    from rouge import Rouge

    try:
        return float(Rouge(metrics=["rouge-l"], stats=["r"]).get_scores(prediction, answer)[0]["rouge-l"]["r"])
    except ValueError:
        return 0.0


def paper_rouge_l_recall(prediction: str, answer: str) -> float:
    """The MDU paper's variant: rouge-score's ROUGE-L recall with stemming."""
    from mdu_cli.evaluation.rouge import rouge_l_recall as stemmed

    return stemmed(prediction, answer)


def normalise(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split()).split()


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(max(normalise(prediction) == normalise(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    def one(answer: str) -> float:
        pred, gold = normalise(prediction), normalise(answer)
        if not pred or not gold:
            return float(pred == gold)
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(gold)
        return 2 * precision * recall / (precision + recall)

    return max(one(a) for a in answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """The paper preset's TriviaQA: some normalised answer occurs in the normalised prediction."""
    pred = " " + " ".join(normalise(prediction)) + " "
    return float(any(normalised and f" {normalised} " in pred
                     for normalised in (" ".join(normalise(a)) for a in answers)))


def bbh_prediction(output: str) -> str:
    """The answer BBH's chain of thought ends with: what follows 'the answer is'
    up to the next period, else the whole output; empty is NOANSWER."""
    found = re.search(r"[tT]he answer is (.*?)\.", output)
    prediction = found.group(1).strip() if found else output.strip()
    return prediction or NO_ANSWER


def first_letter(output: str, letters: int) -> Optional[int]:
    """The paper preset's MMLU: the first standalone letter among the choices' generated."""
    found = re.search(r"\b([A-%s])\b" % chr(ord("A") + letters - 1), output)
    return ord(found.group(1)) - ord("A") if found else None


def mia_scores(text: str, loss: float, log_likelihoods: Sequence[float], normalised: Sequence[float]) -> dict:
    """RWKU's four membership scores of one text (larger: more likely seen in
    training). `loss` is the text's log-likelihood per token (RWKU's LOSS,
    the negated mean loss), `log_likelihoods` the per-token ones, `normalised`
    each minus the mean log-probability under the predicted distribution,
    over its standard deviation (Min-K%++)."""
    k = max(1, int(len(log_likelihoods) * MIN_K))   # RWKU's int(n * k); at least one token
    return {
        "loss": loss,
        "zlib": loss / len(zlib.compress(text.encode("utf-8"))),
        "mink": sum(sorted(log_likelihoods)[:k]) / k,
        "mink++": sum(sorted(normalised)[:k]) / k,
    }


def auc(members: Sequence[float], non_members: Sequence[float]) -> Optional[float]:
    """Area under the ROC curve of a score that should be larger for members:
    P(member > non-member) + P(tie) / 2, as the Mann-Whitney U statistic over
    the product of the sizes gives it."""
    if not members or not non_members:
        return None
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(members, non_members).statistic) / (len(members) * len(non_members))


def truthful_mc(mc1_scores: dict, mc2_scores: dict) -> tuple[float, float]:
    """MC1 (the true answer, listed first, scores above every false one) and
    MC2 (the probability mass of the true answers among all), from
    {'true': [...], 'false': [...]} answer log-likelihoods."""
    mc1 = float(mc1_scores["true"][0] > max(mc1_scores["false"]))
    top = max(mc2_scores["true"] + mc2_scores["false"])   # shift before exp, so no mass underflows to 0/0
    true = sum(math.exp(s - top) for s in mc2_scores["true"])
    false = sum(math.exp(s - top) for s in mc2_scores["false"])
    return mc1, true / (true + false)


def _words(text: str) -> list[str]:
    """NLTK's word tokenisation sentence by sentence. RWKU calls
    nltk.word_tokenize, whose sentence splitter needs the punkt model (a
    download); sentences are split here at '.', '!' or '?' before white space."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [word for sentence in re.split(r"(?<=[.!?])\s+", text.strip()) if sentence
            for word in tokenizer.tokenize(sentence)]


def ngram_entropy(text: str) -> float:
    """RWKU's fluency of one generation: the mean of (2/3) H2 and (4/3) H3, Hn
    the entropy in bits of the text's n-gram frequencies."""
    words = _words(text)
    weighted = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None
