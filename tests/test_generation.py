"""Generation that stops when it is done (mdu_cli/model/sampling.py): a row
leaves the batch once its output is final, with the very tokens of the full
schedule, for fewer forwards."""

import pytest
import torch
from test_evaluation import TableModel

from mdu_cli.model.families import FAMILIES
from mdu_cli.model.inference import load_for_inference
from mdu_cli.model.sampling import finished_rows, generate

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


class _Counting(torch.nn.Module):
    """The model, counting forwards and the rows they carry."""

    def __init__(self, model):
        super().__init__()
        self.model, self.forwards, self.rows = model, 0, 0

    def forward(self, input_ids, attention_mask=None):
        self.forwards += 1
        self.rows += input_ids.shape[0]
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_finished_rows_by_hand():
    m = 0
    new = torch.tensor([[5, 9, m, m],    # stop (9) with everything before it committed: final
                        [m, 9, 6, 7],    # a mask before the stop: not yet
                        [5, 6, 7, 8],    # no stop, all committed: final
                        [5, 6, m, 8],    # no stop, a mask left: not yet
                        [9, m, m, m]])   # a stop first: the output is empty, and final
    assert finished_rows(new, m, torch.tensor([9, 4])).tolist() == [True, False, True, False, True]
    assert finished_rows(new, m, torch.tensor([], dtype=torch.long)).tolist() == [False, False, True, False, False]


def test_a_row_whose_stop_is_committed_leaves_after_that_step():
    """Position 3 + k predicts 100 + 3 + k, except that k = 1 predicts the stop
    token 7, very surely. Blocks of 2 tokens, one per step: the first block
    is done after 2 steps and holds the stop, so the row needs 2 forwards of
    the 8, and the output (cut before the stop) is the same."""
    table = torch.full((16, 128), -5.0)
    for i in range(16):
        table[i, 100 + i] = 5.0
    table[4, 104], table[4, 7] = -5.0, 9.0
    runs = {}
    for early in (False, True):
        model = _Counting(TableModel(table))
        out = generate(model, FAMILIES["llada"], 0, [[1, 2, 3]], max_new_tokens=8, steps=8, block_length=2,
                       stop_ids=(7,), early_exit=early)
        runs[early] = (out, model.forwards)
    assert runs[False] == ([[103]], 8) and runs[True] == ([[103]], 2)


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
@pytest.mark.parametrize("temperature, ordering, block_length", [(0.0, "confidence", 4), (0.0, "entropy", 12),
                                                                 (0.9, "confidence", 3)])
def test_early_exit_gives_the_tokens_of_the_full_schedule(family, temperature, ordering, block_length,
                                                          family_dirs):
    """A batch of prompts of different lengths on each family's fixture, the
    stop tokens taken from an uncut run (its second token of each row) so
    that rows finish at different steps: identical tokens, greedy and sampled
    (the same seed), in fewer row-forwards where there is more than one block
    (within one block a row may need every step to fill what precedes its
    stop)."""
    loaded = load_for_inference(str(family_dirs[family]), trust_remote_code=True, device="cpu")
    questions = ["who wrote the book ?", "where was she born ?", "what is the capital city of the country ?",
                 "name it", "when did the author move to the city by the lake ?"]
    prompts = [loaded.prompt_ids([{"role": "user", "content": q}]) for q in questions]
    settings = dict(max_new_tokens=12, steps=12, block_length=block_length, temperature=temperature,
                    pad_id=loaded.pad_id, ordering=ordering)
    uncut = generate(loaded.model, loaded.family, loaded.mask_token_id, prompts, early_exit=False,
                     generator=torch.Generator().manual_seed(3), **settings)
    stops = sorted({row[1] for row in uncut})
    runs = {}
    for early in (False, True):
        model = _Counting(loaded.model)
        generator = torch.Generator().manual_seed(3)
        out = generate(model, loaded.family, loaded.mask_token_id, prompts, stop_ids=stops, generator=generator,
                       early_exit=early, **settings)
        runs[early] = (out, model.rows)
    assert runs[True][0] == runs[False][0], "the same tokens"
    assert all(len(o) < 12 for o in runs[True][0]), "every row is cut by a stop"
    assert runs[False][1] == 12 * len(prompts)
    if block_length < 12:
        assert runs[True][1] < runs[False][1], "fewer row-forwards"
    else:
        assert runs[True][1] <= runs[False][1]
