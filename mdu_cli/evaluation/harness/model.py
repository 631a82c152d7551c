"""The `mdu` model of lm-evaluation-harness: LLaDA, Dream and masked-LM
checkpoints scored the masked-diffusion way (docs/method.md section 4).

- `loglikelihood(context, continuation)`: a one-token continuation is exact
  (one masked position after the context, its log-softmax at the token); a
  longer one is the Monte Carlo bound L x the mean log-probability of the
  masked continuation tokens over `mc_samples` masks (l ~ U{1..L} of them),
  drawn from `seed` alike for every request, so the choices of a question
  share their draws. `is_greedy`: with the whole continuation masked at
  once, every position's argmax is its token (one extra forward).
- `loglikelihood_rolling(text)`: the same bound over the text after the
  prefix token, in windows of the model's positions, summed.
- `generate_until(context, {until, max_gen_toks})`: the project's sampler,
  greedy, one token per step; the text is cut at the first `until` string.

Every request's forwards are pooled: rows from all requests are sorted by
length and run `batch_size` at a time, right-padded, the padding hidden from
attention. Dream's right-shifted logits are read through `model_logits`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from mdu_cli.config.generation import PRESETS
from mdu_cli.evaluation.likelihood import masked_rows, mc_masks
from mdu_cli.model.inference import LoadedModel, load_for_inference
from mdu_cli.model.sampling import generate

DEFAULT_MC_SAMPLES = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("mdu")
class MduLM(TemplateLM):
    """lm-eval's `--model mdu`: `pretrained` is a Hub id or directory; the
    other model arguments are `revision`, `device`, `trust_remote_code`,
    `mc_samples` (128), `batch_size` (16 rows per forward), `seed` (0), and
    the sampler's `steps` (default: one per new token), `block_length` and
    `ordering` (default: the family's paper preset)."""

    backend = "causal"

    def __init__(self, pretrained: Optional[str] = None, revision: Optional[str] = None, device: str = "auto",
                 trust_remote_code=False, mc_samples=DEFAULT_MC_SAMPLES, batch_size=DEFAULT_BATCH_SIZE, seed=0,
                 steps=None, block_length=None, ordering=None, loaded: Optional[LoadedModel] = None,
                 show_progress=True, **_ignored):
        super().__init__()
        if loaded is None:
            if not pretrained:
                raise ValueError("the mdu model needs pretrained=MODEL (a Hub id or a directory)")
            loaded = load_for_inference(pretrained, revision, trust_remote_code=_flag(trust_remote_code),
                                        device=device if device not in (None, "cuda:0") else "auto")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.mc_samples = int(mc_samples)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self.seed = int(seed)
        preset = PRESETS["paper"][loaded.family.name]
        self.steps = int(steps) if steps else None
        self.block_length = int(block_length) if block_length else preset["block_length"]
        self.ordering = ordering or preset["ordering"]
        self.show_progress = _flag(show_progress)

    # ---- what lm-eval asks of a model -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.loaded.positions or 4096

    @property
    def device(self):
        return self.loaded.device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "mdu").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # The context is plain text (or a chat template's rendering, whose markup
        # the tokenizer reads as its special tokens); nothing is added to it.
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False) -> Optional[str]:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    # ---- scoring ----------------------------------------------------------------------------------------

    def _forward(self, rows: list[tuple[list[int], list[int], list[int]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each (tokens, masked positions, targets) row: the log-probability
        of each target at its masked position, and the most likely token
        there. Rows run in length order, `batch_size` per forward; only these
        numbers are kept (a task of 50,000 rows must not hold 50,000
        vocabulary-wide distributions)."""
        out: list = [None] * len(rows)
        scored = masked_rows(self.loaded, [(tokens, positions) for tokens, positions, _ in rows], self.batch_size,
                             by_length=True)
        for i, logits in tqdm(scored, total=len(rows), desc="mdu scoring", unit="row",
                              disable=not self.show_progress, dynamic_ncols=True):
            log_probs = F.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor(rows[i][2], device=log_probs.device)[:, None]
            out[i] = (log_probs.gather(1, targets).squeeze(1).cpu(), log_probs.argmax(-1).cpu())
        return out

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, cut from the left so that context + continuation fit the model."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                             f"{self.max_length} positions")
        return context[-room:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows: list[tuple[list[int], list[int], list[int]]] = []
        plan = []   # per request: the index of its all-masked row, and of its Monte Carlo rows
        for _, context, continuation in requests:
            context = self._fit(context, continuation)
            start, length = len(context), len(continuation)
            tokens = context + continuation
            everything = len(rows)
            # Everything masked: the exact value of a one-token continuation, and is_greedy.
            rows.append((tokens, list(range(start, start + length)), continuation))
            samples = []
            if length > 1:
                for mask in mc_masks(length, self.mc_samples, torch.Generator().manual_seed(self.seed)):
                    samples.append(len(rows))
                    rows.append((tokens, [start + p for p in mask], [continuation[p] for p in mask]))
            plan.append((everything, samples, continuation))
        scored = self._forward(rows)
        results = []
        for everything, samples, continuation in plan:
            picked, argmax = scored[everything]
            greedy = argmax.tolist() == continuation
            if not samples:
                results.append((float(picked[0]), greedy))
                continue
            means = [float(scored[i][0].mean()) for i in samples]
            # The bound: L x the mean, over samples, of the masked tokens' mean log-probability.
            results.append((len(continuation) * sum(means) / len(means), greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The masked-diffusion bound of each whole text, after the prefix
        token, in windows that fit the model (each window conditioned on the
        prefix token alone), summed over the windows."""
        pairs, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args[:1]
            ids = self.tok_encode(text)
            window = self.max_length - 1
            for first in range(0, len(ids), window):
                pairs.append((None, [self.prefix_token_id], ids[first:first + window]))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (value, _) in zip(owners, self._loglikelihood_tokens(pairs)):
            totals[owner] += value
        return totals

    # ---- generation -------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy completions, grouped by their generation settings and run
        `batch_size` prompts at a time in length order; each cut at the
        first of its `until` strings."""
        groups: dict[int, list[int]] = {}
        settings = []
        for index, request in enumerate(requests):
            context, kwargs = request.args[0], dict(request.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            settings.append((context, until, max_new))
            groups.setdefault(max_new, []).append(index)
        outputs = [""] * len(requests)
        loaded = self.loaded
        for max_new, indices in groups.items():
            prompts = {i: self.tok_encode(settings[i][0])[-(self.max_length - max_new):] for i in indices}
            ordered = sorted(indices, key=lambda i: len(prompts[i]))
            steps = self.steps or max_new
            block = min(self.block_length, max_new)
            for first in range(0, len(ordered), self.batch_size):
                chunk = ordered[first:first + self.batch_size]
                new = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompts[i] for i in chunk],
                               max_new_tokens=max_new, steps=steps, block_length=block, pad_id=loaded.pad_id,
                               stop_ids=loaded.stop_ids(), ordering=self.ordering)
                for i, ids in zip(chunk, new):
                    outputs[i] = cut_at(self.tokenizer.decode(ids, skip_special_tokens=True), settings[i][1])
        return outputs


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any of `until`."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]
