"""The forgetting measures and the sampler, against independent computations."""

import math

import numpy as np
import pytest
import torch

from mdu_cli.evaluation.likelihood import answer_scores, mc_masks
from mdu_cli.evaluation.report import geometric_truth_ratio as truth_ratio
from mdu_cli.evaluation.rouge import rouge_l_recall
from mdu_cli.model.families import FAMILIES
from mdu_cli.model.inference import LoadedModel, load_for_inference
from mdu_cli.model.sampling import generate, transfer_schedule

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


class TableModel(torch.nn.Module):
    """Logits that depend only on the position (and, for `reads_input`, on the
    token there): a model whose predictions a test can work out by hand."""

    def __init__(self, table: torch.Tensor, reads_input: bool = False):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.reads_input = reads_input

    def forward(self, input_ids, attention_mask=None):
        logits = self.table[: input_ids.shape[1]].unsqueeze(0).expand(input_ids.shape[0], -1, -1).clone()
        if self.reads_input:
            logits = logits + 0.01 * input_ids.unsqueeze(-1).float()
        return type("Output", (), {"logits": logits})()


class RecordingTableModel(TableModel):
    """A TableModel that records, at every forward, the first row's tokens in
    `columns`: what the sampler had committed before each step."""

    def __init__(self, table: torch.Tensor, columns: slice):
        super().__init__(table)
        self.columns, self.calls = columns, []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids[0, self.columns].tolist())
        return super().forward(input_ids, attention_mask)


def _loaded(model, family="llada", mask=0):
    return LoadedModel(model=model, tokenizer=None, family=FAMILIES[family], mask_token_id=mask, source=None,
                       device=torch.device("cpu"))


def test_mc_masks_draw_l_uniformly_and_distinct_positions():
    masks = mc_masks(5, 5000, torch.Generator().manual_seed(0))
    counts = np.bincount([len(m) for m in masks], minlength=6)[1:]
    assert counts.min() > 850 and counts.max() < 1150  # l ~ U{1..5}
    assert all(len(set(m)) == len(m) and all(0 <= p < 5 for p in m) for m in masks)
    singles = np.bincount([m[0] for m in masks if len(m) == 1], minlength=5)
    assert singles.min() > 120  # which single position is masked is uniform too


def test_answer_scores_against_float64_reference():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(12, 9, generator=gen)
    loaded = _loaded(TableModel(table))
    prompt, answer = [3, 4, 5], [6, 7, 8, 2, 1]
    masks = mc_masks(len(answer), 40, torch.Generator().manual_seed(2))
    got = answer_scores(loaded, prompt, answer, masks, batch_size=7)
    logp = table.double().log_softmax(-1).numpy()
    for score, mask in zip(got, masks):
        want = -sum(logp[len(prompt) + p, answer[p]] for p in mask) / len(mask)
        assert score == pytest.approx(want, rel=1e-5)


def test_probability_of_a_uniform_model_is_one_over_vocab():
    loaded = _loaded(TableModel(torch.zeros(20, 13)))
    scores = answer_scores(loaded, [1, 2], [3, 4, 5, 6], mc_masks(4, 64, torch.Generator().manual_seed(0)))
    assert math.exp(-np.mean(scores)) == pytest.approx(1 / 13, rel=1e-6)


def test_dream_scores_read_the_previous_position():
    table = torch.full((8, 6), -10.0)
    for i in range(8):
        table[i, (i + 1) % 6] = 10.0  # position i is sure of the token at i + 1
    shifted, unshifted = _loaded(TableModel(table), "dream"), _loaded(TableModel(table), "llada")
    # Answer tokens sit at positions 2, 3, 4. Read from the previous position
    # (Dream), they are predicted as 2, 3, 4; read in place, as 3, 4, 5.
    prompt, answer = [0, 1], [2, 3, 4]
    masks = [[0, 1, 2]]
    assert answer_scores(shifted, prompt, answer, masks)[0] < 1e-6
    assert answer_scores(unshifted, prompt, answer, masks)[0] > 10


def test_truth_ratio():
    assert truth_ratio(1.0, [2.0, 4.0]) == pytest.approx(math.exp(1.0 - 3.0))


@pytest.mark.parametrize("prediction, reference, want", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("a dog", "the cat sat", 0.0),
    ("cat the sat", "the cat sat", 2 / 3),
    ("He was running quickly", "he runs quickly", 1.0),  # stemming: running/runs -> run
    ("Paris, France!", "paris france", 1.0),
])
def test_rouge_l_recall(prediction, reference, want):
    assert rouge_l_recall(prediction, reference) == pytest.approx(want)


def test_transfer_schedule_sums_to_width():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert sum(transfer_schedule(7, 7)) == 7 and transfer_schedule(2, 5) == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sampler_fills_every_mask_and_respects_the_shift(family):
    vocab, mask = 200, 0
    table = torch.full((64, vocab), -5.0)
    for i in range(64):
        table[i, 100 + i] = 5.0  # position i predicts token 100 + i
    model = TableModel(table)
    prompts = [[1, 2, 3], [4, 5]]
    out = generate(model, FAMILIES[family], mask, prompts, max_new_tokens=10, steps=5, block_length=4)
    for prompt, new in zip(prompts, out):
        assert len(new) == 10 and mask not in new
        offset = 0 if family == "llada" else -1  # Dream reads token i from position i - 1
        assert new == [100 + len(prompt) + k + offset for k in range(10)]


def test_sampler_on_a_real_fixture(llada_dir, dream_dir, masked_lm_dir):
    for directory in (llada_dir, dream_dir, masked_lm_dir):
        loaded = load_for_inference(str(directory))
        prompt = loaded.prompt_ids([{"role": "user", "content": "who wrote the book ?"}])
        first = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompt, prompt[:4]],
                         max_new_tokens=9, steps=9, block_length=3, pad_id=loaded.pad_id)
        again = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompt, prompt[:4]],
                         max_new_tokens=9, steps=9, block_length=3, pad_id=loaded.pad_id)
        assert first == again  # greedy is deterministic
        assert all(len(row) == 9 and loaded.mask_token_id not in row for row in first)


def test_sampler_commits_most_confident_first():
    vocab, mask = 50, 0
    table = torch.zeros(8, vocab)
    confidences = [1.0, 6.0, 3.0, 9.0]  # per generated position
    for k, c in enumerate(confidences):
        table[2 + k, 10 + k] = c
    recorder = RecordingTableModel(table, slice(2, 6))
    calls = recorder.calls
    generate(recorder, FAMILIES["llada"], mask, [[1, 2]], max_new_tokens=4, steps=4, block_length=4)
    # After each step one more position is filled, most confident first: 3, 1, 2, 0.
    assert calls[1] == [0, 0, 0, 13] and calls[2] == [0, 11, 0, 13] and calls[3] == [0, 11, 12, 13]


@pytest.mark.parametrize("stop_ids, kept", [((7, 8), 2), ((8,), 5), ((9,), 8), ((100 + 3,), 0)])
def test_generation_is_cut_before_the_first_stop_token(stop_ids, kept):
    """Position 3 + k predicts 100 + 3 + k, except that k = 2 predicts stop
    token 7 and k = 5 stop token 8: the completion ends before the first
    position holding any of the stop ids, and what follows it is dropped even
    where it is ordinary text."""
    vocab, mask = 128, 0
    table = torch.full((16, vocab), -5.0)
    for i in range(16):
        table[i, 100 + i] = 5.0
    table[3 + 2, 100 + 5], table[3 + 2, 7] = -5.0, 5.0
    table[3 + 5, 100 + 8], table[3 + 5, 8] = -5.0, 5.0
    full = [103, 104, 7, 106, 107, 8, 109, 110]
    out = generate(TableModel(table), FAMILIES["llada"], mask, [[1, 2, 3]], max_new_tokens=8, steps=8,
                   block_length=8, stop_ids=stop_ids)
    assert out == [full[:kept]]


def test_blocks_are_committed_left_to_right_whatever_the_confidence():
    """Semi-autoregressive: no position of the second block is filled while
    the first still holds a mask, though the second block's predictions are
    the more confident ones; within a block, most confident first."""
    vocab, mask = 50, 0
    table = torch.zeros(8, vocab)
    for k, c in enumerate([1.0, 2.0, 8.0, 9.0]):  # positions 2..5; the second block (4, 5) is surer
        table[2 + k, 10 + k] = c
    recorder = RecordingTableModel(table, slice(2, 6))
    calls = recorder.calls
    out = generate(recorder, FAMILIES["llada"], mask, [[1, 2]], max_new_tokens=4, steps=4, block_length=2)
    assert out == [[10, 11, 12, 13]]
    assert calls == [[0, 0, 0, 0], [0, 11, 0, 0], [10, 11, 0, 0], [10, 11, 0, 13]]


def test_generate_command_prints_a_completion(dream_dir):
    from click.testing import CliRunner

    from mdu_cli.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(dream_dir), "--prompt", "who wrote the book ?",
                                      "--max-new-tokens", "6", "--steps", "6", "--block-length", "3"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() and "<|mask|>" not in result.stdout


def test_eval_command_with_base_and_truth_ratio(llada_dir, tmp_path):
    import json as _json

    from click.testing import CliRunner

    from mdu_cli.cli import cli

    data = tmp_path / "f.jsonl"
    data.write_text(_json.dumps({"question": "who wrote the book ?", "answer": "astrid wrote it .",
                                 "perturbed_answer": ["tarrin wrote it .", "nobody did ."]}) + "\n")
    result = CliRunner().invoke(cli, ["eval", str(llada_dir), "--base", str(llada_dir), "--forget", str(data),
                                      "--mc-samples", "8", "--max-new-tokens", "4", "--steps", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    report = _json.loads(result.stdout)
    forget = report["splits"]["forget"]
    assert set(forget) == {"records", "probability", "rouge_l", "truth_ratio"}
    assert report["base"]["splits"]["forget"] == forget  # same model, same seed
    assert report["change"]["forget"]["probability"] == 0
    assert not (llada_dir / "eval.json").exists()  # only mdu outputs get an eval.json


def test_commit_order_uses_the_probability_of_the_prediction_itself():
    """Position 2 has the higher top logit (2.0) among four close rivals (1.9),
    position 3 a lower but clear winner (1.5). Under the model's softmax
    position 3 is the more confident and is committed first; a confidence read
    from the raw logits would commit position 2 first."""
    vocab, mask = 16, 0
    table = torch.zeros(6, vocab)
    table[2, 10] = 2.0
    table[2, 11:15] = 1.9
    table[3, 12] = 1.5
    probs = torch.softmax(torch.cat([table[2:4, 1:]], dim=0), dim=-1).max(-1).values
    assert probs[1] > probs[0], "the premise: position 3 is the more confident"
    recorder = RecordingTableModel(table, slice(2, 4))
    calls = recorder.calls
    out = generate(recorder, FAMILIES["llada"], mask, [[1, 2]], max_new_tokens=2, steps=2, block_length=2)
    assert calls[1] == [0, 12], "the clear winner first"
    assert out == [[10, 12]]


def test_entropy_ordering_commits_the_most_peaked_prediction_first():
    """Position 2 predicts token 10 with 0.6 and spreads the rest over four
    tokens (entropy 1.23 nats); position 3 splits evenly between two tokens
    (0.5 each, entropy 0.69). Low-confidence remasking commits position 2 first
    (0.6 > 0.5), Dream's entropy ordering position 3 (0.69 < 1.23)."""
    vocab, mask = 16, 0
    table = torch.full((6, vocab), -1e4)
    table[2, 10], table[2, 11:15] = math.log(0.6), math.log(0.1)
    table[3, 12], table[3, 13] = 0.0, -1e-3  # 12 wins the argmax, by a hair
    first = {}
    for ordering in ("confidence", "entropy"):
        recorder = RecordingTableModel(table, slice(2, 4))
        calls = recorder.calls
        out = generate(recorder, FAMILIES["llada"], mask, [[1, 2]], max_new_tokens=2, steps=2,
                       block_length=2, ordering=ordering)
        assert out == [[10, 12]]
        first[ordering] = calls[1]
    assert first == {"confidence": [10, 0], "entropy": [0, 12]}


def test_the_paper_preset_per_family_and_explicit_options_win():
    from mdu_cli.config.generation import resolve_generation

    assert resolve_generation({"preset": "paper"}, "llada") == {
        "max_new_tokens": 256, "steps": 256, "block_length": 128, "ordering": "confidence", "preset": "paper"}
    dream = resolve_generation({"preset": "paper", "steps": 64}, "dream")
    assert dream == {"max_new_tokens": 256, "steps": 64, "block_length": 256, "ordering": "entropy",
                     "preset": "paper"}
    assert resolve_generation({"max_new_tokens": 8, "steps": 8, "block_length": 8}, "dream")["ordering"] == "confidence"
