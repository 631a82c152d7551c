"""Generation from a masked diffusion LM: low-confidence remasking.

The response starts as `max_new_tokens` mask tokens after the prompt. It is
filled block by block (`block_length` tokens, left to right, as LLaDA's
semi-autoregressive sampler does); within a block, each of the block's steps
predicts every masked position and commits the most confident predictions,
so that the block is complete after its share of `steps`. Temperature 0 is
greedy; above 0, Gumbel noise on the logits samples, from the nucleus when
`top_p` < 1 (the smallest set of most probable tokens whose probabilities,
after the temperature, sum to at least top_p). Dream's right-shifted
logits are read through `model.families.align_logits`, like everywhere else.

Which predictions count as most confident is the `ordering`: "confidence"
(LLaDA's low-confidence remasking: the probability of the chosen token) or
"entropy" (Dream's default: the lowest entropy of the predicted distribution).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from mdu_cli.config.choices import ORDERINGS
from mdu_cli.model.families import Family, model_logits


def transfer_schedule(width: int, steps: int) -> list[int]:
    """How many positions to commit at each step so that `width` are done in `steps`."""
    base, extra = divmod(width, steps)
    return [base + (1 if k < extra else 0) for k in range(steps)]


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` with every token outside the nucleus at -inf: per row, keep the
    most probable tokens until their probability reaches top_p (the token that
    crosses it included, so at least one token stays)."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probabilities = torch.softmax(ordered, dim=-1)
    # The mass before each token: a token is kept when what precedes it is still short of top_p.
    before = probabilities.cumsum(-1) - probabilities
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def finished_rows(new_tokens: torch.Tensor, mask_token_id: int, stops: torch.Tensor) -> torch.Tensor:
    """(rows,) True where a row's output can no longer change: every position
    before its first committed stop token is committed (the output is cut
    there, and a committed token never changes), or, without a stop, every
    position is. `new_tokens`: (rows, max_new_tokens)."""
    is_stop = torch.isin(new_tokens, stops)
    width = new_tokens.shape[1]
    index = torch.arange(width, device=new_tokens.device)
    first_stop = torch.where(is_stop, index, width).min(dim=1).values
    pending = (new_tokens == mask_token_id) & (index[None, :] < first_stop[:, None])
    return ~pending.any(dim=1)


@torch.no_grad()
def generate(
    model,
    family: Family,
    mask_token_id: int,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    steps: int = 128,
    block_length: int = 32,
    temperature: float = 0.0,
    pad_id: int = 0,
    stop_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    ordering: str = "confidence",
    top_p: float = 1.0,
    early_exit: bool = True,
) -> list[list[int]]:
    """Complete each prompt (token ids); returns the new tokens of each, cut
    before the first stop id.

    With `early_exit` (the default) a row leaves the batch once its output is
    final (`finished_rows`), and generation ends when every row has: the
    tokens are those of the full schedule (each row's logits depend on its
    own tokens only, and the sampling noise is drawn for every row as
    before), for fewer forwards."""
    if max_new_tokens < 1 or steps < 1 or block_length < 1:
        raise ValueError("max_new_tokens, steps and block_length must be >= 1")
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}")
    if not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    device = next(model.parameters()).device
    rows, lengths = len(prompts), [len(p) for p in prompts]
    width = max(lengths) + max_new_tokens
    x = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        x[row, :lengths[row]] = torch.tensor(list(prompt), dtype=torch.long)
        x[row, lengths[row]:lengths[row] + max_new_tokens] = mask_token_id
        attention[row, :lengths[row] + max_new_tokens] = 1
    x, attention = x.to(device), attention.to(device)
    # Column of every generated position, per row: (rows, max_new_tokens).
    positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(max_new_tokens, device=device)[None, :]
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)  # the rows still computed

    block_length = min(block_length, max_new_tokens)
    blocks = math.ceil(max_new_tokens / block_length)
    # More steps than positions in a block commit nothing extra (empty steps are
    # skipped): capping them keeps a huge --steps from building a huge schedule.
    steps_per_block = min(block_length, max(1, steps // blocks))
    for block in range(blocks):
        block_columns = positions[:, block * block_length:(block + 1) * block_length]
        for count in transfer_schedule(block_columns.shape[1], steps_per_block):
            if count == 0:
                continue
            if active.numel() == 0:
                break
            columns = block_columns[active]
            logits = model_logits(model, x[active], attention[active], family)
            # Only the block's logits are read: upcast those alone.
            block_logits = logits.gather(1, columns[..., None].expand(-1, -1, logits.shape[-1])).float()
            del logits
            block_logits[..., mask_token_id] = -math.inf  # never "fill" a mask with a mask
            if temperature > 0:
                scaled = block_logits / temperature
                if top_p < 1:
                    scaled = nucleus(scaled, top_p)
                # Drawn for every row, finished or not, so a row's noise is
                # what it would be without the early exit.
                shape = (rows, *block_logits.shape[1:])
                uniform = torch.rand(shape, generator=generator).to(device)[active].clamp_(1e-20, 1.0)
                choice = (scaled - torch.log(-torch.log(uniform))).argmax(-1)
            else:
                choice = block_logits.argmax(-1)
            probabilities = torch.softmax(block_logits, dim=-1)
            if ordering == "entropy":
                # Negative entropy: a peaked prediction is committed first.
                confidence = (probabilities * torch.log_softmax(block_logits, dim=-1).nan_to_num(0.0)).sum(-1)
            else:
                confidence = probabilities.gather(-1, choice[..., None]).squeeze(-1)
            current = x[active]
            still_masked = current.gather(1, columns) == mask_token_id
            confidence = torch.where(still_masked, confidence, torch.full_like(confidence, -math.inf))
            picked = confidence.topk(count, dim=1).indices
            current.scatter_(1, columns.gather(1, picked), choice.gather(1, picked))
            x[active] = current
            if early_exit:
                done = finished_rows(current.gather(1, positions[active]), mask_token_id, stops)
                active = active[~done]

    outputs = []
    stop_set = set(stop_ids)
    for row in range(rows):
        new = x[row, lengths[row]:lengths[row] + max_new_tokens].tolist()
        cut = next((i for i, token in enumerate(new) if token in stop_set), len(new))
        outputs.append(new[:cut])
    return outputs
