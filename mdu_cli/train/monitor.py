"""Watching a run while it trains: experiment trackers and a periodic probe.

- `--report-to tensorboard,wandb,trackio`: accelerate's trackers, installed as
  optional extras (`pip install 'mdu-cli[tensorboard]'`). They receive the
  numeric fields of each `train_log.jsonl` entry, at its step, and the run's
  options as hyperparameters. Never any text of the data.
- `--eval-every N`: every N optimizer steps (and before the first), the answer
  probability (the Monte Carlo estimator of `mdu eval`) of the first
  --eval-records forget and retain records, so that the unlearning curve is
  visible as it happens. It goes into the log entry of that step as "eval".
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

PROBE_SAMPLES = 32  # Monte Carlo samples per probed answer: a curve, not a measurement


def tracker_config(options: dict, public_ids: set = frozenset()) -> dict:
    """The run's options as hyperparameters: scalars only (trackers take no
    lists), and no local path or file name (wandb and trackio send them to a
    server; the forget file's name may be the person being forgotten): those
    read "(local)", Hub ids in `public_ids` and hf:// names stay."""
    from mdu_cli.hub.publication import redact_paths

    options = redact_paths(options, set(public_ids))
    return {k: v for k, v in options.items() if isinstance(v, (bool, int, float, str))}


def numeric_fields(entry: dict) -> dict[str, float]:
    """What a tracker receives of a log entry: every finite number, the probe's
    values as eval/forget_probability and eval/retain_probability."""
    values = {k: float(v) for k, v in entry.items()
              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    for k, v in (entry.get("eval") or {}).items():
        if isinstance(v, (int, float)) and math.isfinite(v):
            values[f"eval/{k}"] = float(v)
    return values


class Probe:
    """The periodic answer-probability probe on a few forget and retain records.
    Every rank runs it alike (a forward under DDP or FSDP is collective); the
    masks come from a fixed seed, so every probe scores the same positions and
    the curve shows the model, not the sampling."""

    def __init__(self, forget: Sequence, retain: Sequence, records: int, tokenizer, family, mask_token_id: int,
                 seed: int):
        from mdu_cli.data.tokenization import encode_prompt, encode_text

        # Tokenised as `mdu eval` does (the answer's text, without the end of
        # turn), so that the probe's last value is what `mdu eval` reports.
        self.splits = {
            split: [(encode_prompt(tokenizer, r.prompt_messages, where=r.source),
                     encode_text(tokenizer, r.response)) for r in records[:count]]
            for split, records, count in (("forget", list(forget), records), ("retain", list(retain), records))
        }
        self.family, self.mask_token_id, self.seed = family, mask_token_id, seed

    @torch.no_grad()
    def __call__(self, model, device) -> dict[str, float]:
        from mdu_cli.evaluation.likelihood import answer_scores, mc_masks
        from mdu_cli.model.inference import LoadedModel

        was_training = model.training
        model.eval()
        loaded = LoadedModel(model=model, tokenizer=None, family=self.family, mask_token_id=self.mask_token_id,
                             source=None, device=device)
        result = {}
        try:
            for split, examples in self.splits.items():
                if not examples:
                    continue
                generator = torch.Generator().manual_seed(self.seed)
                probabilities = []
                for prompt, answer in examples:
                    scores = answer_scores(loaded, prompt, answer, mc_masks(len(answer), PROBE_SAMPLES, generator))
                    probabilities.append(math.exp(-sum(scores) / len(scores)))
                result[f"{split}_probability"] = sum(probabilities) / len(probabilities)
        finally:
            model.train(was_training)
        return result
