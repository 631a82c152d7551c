"""ROUGE-L recall with Porter stemming, tokenised as the rouge-score package does."""

from __future__ import annotations

import re

_stemmer = None


def _tokens(text: str) -> list[str]:
    """rouge-score's tokenisation: lowercase, alphanumeric runs, Porter stems of
    tokens longer than 3 characters."""
    global _stemmer
    if _stemmer is None:
        from nltk.stem import porter

        _stemmer = porter.PorterStemmer()
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [_stemmer.stem(w) if len(w) > 3 else w for w in words]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """Longest common subsequence of the token lists over the reference length."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not ref or not pred:
        return 0.0
    previous = [0] * (len(pred) + 1)
    for r in ref:
        current = [0]
        for j, p in enumerate(pred, start=1):
            current.append(previous[j - 1] + 1 if r == p else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1] / len(ref)


def rouge_scores(loaded, records, generation: dict, batch_size: int) -> list[float]:
    """ROUGE-L recall of each record's greedy generation, prompts batched
    (padding is invisible to the real tokens, so a batch generates what one
    prompt at a time would)."""
    from mdu_cli.config.generation import generation_kwargs
    from mdu_cli.model.sampling import generate

    scores = []
    for first in range(0, len(records), batch_size):
        chunk = records[first:first + batch_size]
        prompts = [loaded.prompt_ids(r.prompt_messages, where=r.source) for r in chunk]
        outputs = generate(loaded.model, loaded.family, loaded.mask_token_id, prompts, pad_id=loaded.pad_id,
                           stop_ids=loaded.stop_ids(), **generation_kwargs(generation))
        scores += [rouge_l_recall(loaded.tokenizer.decode(ids, skip_special_tokens=True), r.response)
                   for ids, r in zip(outputs, chunk)]
    return scores
