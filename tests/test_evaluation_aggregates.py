"""The evaluation's aggregates and the sampler's random draws, worked out here.

`ContextModel` predicts from what it is fed (the token at each position and
the one before it), so scoring an answer with some tokens masked differs from
scoring it with others: an estimator that masked the wrong positions, used the
wrong number of samples or mixed up gold and perturbed answers gives other
numbers than the float64 computation in this file.
"""

import math

import pytest
import torch
from conftest import write_jsonl

from mdu_cli.data.records import load_dataset
from mdu_cli.evaluation.report import evaluate_split, format_eval, relative_change
from mdu_cli.evaluation.rouge import rouge_l_recall
from mdu_cli.model.families import FAMILIES
from mdu_cli.model.inference import LoadedModel
from mdu_cli.model.sampling import generate

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


class ContextModel(torch.nn.Module):
    """logits[b, i] = position[i] + here[x_i] + before[x_(i-1)]."""

    def __init__(self, vocab: int, width: int = 96, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.position = torch.nn.Parameter(torch.randn(width, vocab, generator=gen), requires_grad=False)
        self.here = torch.nn.Parameter(torch.randn(vocab, vocab, generator=gen), requires_grad=False)
        self.before = torch.nn.Parameter(torch.randn(vocab, vocab, generator=gen), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        previous = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
        logits = self.position[: input_ids.shape[1]] + self.here[input_ids] + self.before[previous]
        return type("Output", (), {"logits": logits})()


@pytest.fixture(scope="module")
def loaded(llada_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llada_dir)
    model = ContextModel(len(tokenizer))
    return LoadedModel(model, tokenizer, FAMILIES["llada"], tokenizer.convert_tokens_to_ids("<|mdm_mask|>"), None,
                       torch.device("cpu"))


RECORDS = [
    {"question": "who wrote the book ?", "answer": "astrid wrote it in the north .",
     "perturbed_answer": ["tarrin wrote it .", "nobody wrote the book in the south ."]},
    {"question": "where was astrid born ?", "answer": "in a village by the lake .",
     "perturbed_answer": ["in paris ."]},
    {"question": "name a famous novel .", "answer": "the green mountain ."},
]


def _stratified_masks(length, samples, generator):
    """The stratified draw by hand: one offset u, sample j masks
    floor((j + u) / n * L) + 1 tokens (at most L); the samples' windows run
    end to end over the positions, a fresh permutation for each lap of L,
    wrapping around within it."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    counts = [min(math.floor((j + u) / samples * length), length - 1) + 1 for j in range(samples)]
    starts = [sum(counts[:j]) for j in range(samples)]
    permutations = [torch.randperm(length, generator=generator).tolist() for _ in range(starts[-1] // length + 1)]
    return [[permutations[start // length][(start + k) % length] for k in range(count)]
            for start, count in zip(starts, counts)]


def _score64(loaded, prompt, answer, samples, generator):
    """The estimator by hand: per sample, its masked positions, the mean
    cross-entropy there; then the mean over samples."""
    total = 0.0
    for positions in _stratified_masks(len(answer), samples, generator):
        ids = list(prompt) + list(answer)
        for p in positions:
            ids[len(prompt) + p] = loaded.mask_token_id
        logits = loaded.model(torch.tensor([ids])).logits[0].double()
        ce = [-(logits[len(prompt) + p].log_softmax(-1)[answer[p]]) for p in positions]
        total += float(sum(ce)) / len(positions)
    return total / samples


def _prompt(loaded, question):
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_evaluate_split_against_a_hand_computation(loaded, tmp_path):
    records = list(load_dataset(write_jsonl(tmp_path / "f.jsonl", RECORDS)).records)
    samples, seed = 7, 3
    result = evaluate_split(loaded, records, samples, seed, {"max_new_tokens": 0}, batch_size=3,
                            show_progress=False)
    generator = torch.Generator().manual_seed(seed)
    probabilities, ratios = [], []
    for raw in RECORDS:
        prompt = _prompt(loaded, raw["question"])
        encode = lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        gold = _score64(loaded, prompt, encode(raw["answer"]), samples, generator)
        probabilities.append(math.exp(-gold))
        if "perturbed_answer" in raw:
            wrong = [_score64(loaded, prompt, encode(a), samples, generator) for a in raw["perturbed_answer"]]
            ratios.append(math.exp(gold - sum(wrong) / len(wrong)))
    assert result["records"] == 3
    assert result["probability"] == pytest.approx(sum(probabilities) / 3, rel=1e-5)
    assert result["truth_ratio"] == pytest.approx(sum(ratios) / 2, rel=1e-5)
    assert "rouge_l" not in result  # generation was off


def test_rouge_aggregate_is_the_mean_over_records(loaded, tmp_path):
    records = list(load_dataset(write_jsonl(tmp_path / "f.jsonl", RECORDS)).records)
    generation = {"max_new_tokens": 6, "steps": 6, "block_length": 3}
    result = evaluate_split(loaded, records, 2, 0, generation, show_progress=False)
    recalls = []
    for raw in RECORDS:
        [new] = generate(loaded.model, loaded.family, loaded.mask_token_id, [_prompt(loaded, raw["question"])],
                         pad_id=loaded.pad_id, stop_ids=loaded.stop_ids(), **generation)
        recalls.append(rouge_l_recall(loaded.tokenizer.decode(new, skip_special_tokens=True), raw["answer"]))
    assert result["rouge_l"] == pytest.approx(sum(recalls) / len(recalls))


def test_relative_change_and_the_table():
    model = {"forget": {"records": 2, "probability": 0.2, "rouge_l": 0.5},
             "retain": {"records": 3, "probability": 0.9, "rouge_l": 0.0}}
    base = {"forget": {"records": 2, "probability": 0.8, "rouge_l": 0.25},
            "retain": {"records": 3, "probability": 0.6, "rouge_l": 0.0}}
    change = relative_change(model, base)
    assert change["forget"]["probability"] == pytest.approx(0.2 / 0.8 - 1)  # -75%: the model forgot
    assert change["forget"]["rouge_l"] == pytest.approx(1.0)
    assert change["retain"]["probability"] == pytest.approx(0.5)
    assert change["retain"]["rouge_l"] is None  # the base scored 0: no ratio
    table = format_eval({"splits": model, "base": {"splits": base}, "change": change}).splitlines()
    assert table[0].split() == ["split", "metric", "base", "model", "change"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in table[1:]}
    assert rows[("forget", "probability")] == ["0.8000", "0.2000", "-75%"]
    assert rows[("forget", "rouge_l")] == ["0.2500", "0.5000", "+100%"]
    assert rows[("retain", "rouge_l")] == ["0.0000", "0.0000", "-"]
    alone = format_eval({"splits": model}).splitlines()
    assert alone[0].split() == ["split", "metric", "model"] and alone[1].split() == ["forget", "probability", "0.2000"]


def _reference_sample(model, mask_id, prompt, new_tokens, steps, temperature, generator):
    """One block, one position committed per step when steps == new_tokens:
    Gumbel-max over the block's positions (mask token excluded), then the most
    confident still-masked position is committed."""
    ids = list(prompt) + [mask_id] * new_tokens
    start = len(prompt)
    per_step = [new_tokens // steps + (1 if k < new_tokens % steps else 0) for k in range(steps)]
    for count in per_step:
        logits = model(torch.tensor([ids])).logits[0, start:start + new_tokens].float()
        logits[:, mask_id] = -math.inf
        uniform = torch.rand((1, new_tokens, logits.shape[-1]), generator=generator)[0].clamp(1e-20, 1.0)
        noisy = logits / temperature - torch.log(-torch.log(uniform))
        choice = noisy.argmax(-1)
        probs = torch.softmax(logits, -1)
        candidates = sorted(((float(probs[k, choice[k]]), k) for k in range(new_tokens)
                             if ids[start + k] == mask_id), reverse=True)
        for _, k in candidates[:count]:
            ids[start + k] = int(choice[k])
    return ids[start:]


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_sampling_with_temperature_is_a_gumbel_max_draw(loaded, temperature):
    prompt = _prompt(loaded, "who wrote the book ?")
    got = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompt], max_new_tokens=6, steps=6,
                   block_length=6, temperature=temperature, generator=torch.Generator().manual_seed(11))
    want = _reference_sample(loaded.model, loaded.mask_token_id, prompt, 6, 6, temperature,
                             torch.Generator().manual_seed(11))
    assert got == [want]
    greedy = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompt], max_new_tokens=6, steps=6,
                      block_length=6)
    assert got != greedy  # the noise is really applied: these draws differ from the greedy fill
