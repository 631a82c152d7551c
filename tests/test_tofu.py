"""TOFU's definitions (`mdu eval --benchmark tofu`), each against a hand
computation, and the report's numbers recomputed from the report itself."""

import json
import math

import pytest
from click.testing import CliRunner
from conftest import write_jsonl
from test_hostile_inputs import snapshot

from mdu_cli.cli import cli
from mdu_cli.data.records import Record
from mdu_cli.evaluation.benchmarks.tofu import measures as tofu

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


def _record(answer, perturbed, paraphrased=None):
    return Record(messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": answer}),
                  source="f.jsonl:1", perturbed=tuple(perturbed), paraphrased=paraphrased)


class _Scores:
    """answer_score_many stand-in: a fixed mean cross-entropy per answer text."""

    def __init__(self, table):
        self.table = table

    def __call__(self, loaded, prompt_ids, answers, samples, generator, batch_size=32, estimator="stratified"):
        return [self.table[answer] for answer in answers]


class _Loaded:
    def prompt_ids(self, messages, where=""):
        return [1, 2]


def test_per_record_measures_follow_the_definitions(monkeypatch):
    # Per-token probabilities: gold e^-0.5, paraphrase e^-1, perturbed e^-2 and e^-3.
    monkeypatch.setattr(tofu, "answer_score_many", _Scores({"gold": 0.5, "para": 1.0, "w1": 2.0, "w2": 3.0}))
    got = tofu.record_measures(_Loaded(), _record("gold", ["w1", "w2"], "para"), 4, None, 2)
    p_gold, p_para, p1, p2 = math.exp(-0.5), math.exp(-1.0), math.exp(-2.0), math.exp(-3.0)
    assert got["probability"] == pytest.approx(p_gold)
    assert got["paraphrased_probability"] == pytest.approx(p_para)
    assert got["perturbed_probability"] == pytest.approx((p1 + p2) / 2)
    assert got["truth_ratio"] == pytest.approx(((p1 + p2) / 2) / p_para), "mean of the perturbed over the paraphrase"
    assert got["probability_normalised"] == pytest.approx(p_gold / (p_gold + p1 + p2))
    # No paraphrase: the answer itself stands in.
    got = tofu.record_measures(_Loaded(), _record("gold", ["w1"]), 4, None, 2)
    assert got["truth_ratio"] == pytest.approx(p1 / p_gold)


def test_split_aggregates_by_hand():
    per_record = [
        {"probability": 0.8, "paraphrased_probability": 0.6, "perturbed_probability": 0.3, "truth_ratio": 0.5,
         "probability_normalised": 0.7, "rouge_l": 1.0},
        {"probability": 0.4, "paraphrased_probability": 0.2, "perturbed_probability": 0.4, "truth_ratio": 2.0,
         "probability_normalised": 0.3, "rouge_l": 0.5},
        {"probability": 0.6, "paraphrased_probability": 0.5, "perturbed_probability": 0.5, "truth_ratio": 1.0,
         "probability_normalised": 0.5, "rouge_l": 0.0},
    ]
    forget = tofu.split_report("forget", per_record)
    assert forget["probability"] == pytest.approx(0.6)
    assert forget["rouge_l"] == pytest.approx(0.5)
    assert forget["truth_ratio_closer_to_1"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # min(R, 1/R)
    assert forget["truth_score"] == pytest.approx((0.5 + 0 + 0) / 3)  # max(0, 1 - R)
    assert forget["truth_ratio_per_record"] == [0.5, 2.0, 1.0]
    assert "probability_normalised" not in forget, "normalised only where TOFU normalises"
    authors = tofu.split_report("real_authors", per_record)
    assert authors["probability_normalised"] == pytest.approx(0.5)


def test_extreme_ratios_aggregate_at_their_limits():
    """Edge values of the statistics: a paraphrase whose probability
    underflowed to 0 gives R = inf (null in JSON), which is as far from 1 as
    possible (min(R, 1/R) = 0) and earns no truth score; R = 0 (every wrong
    answer underflowed) is as far from 1 too, with a full truth score; huge
    and tiny finite R stay finite and ordered."""
    assert tofu.truth_ratio([0.2, 0.4], 0.0) == math.inf
    assert tofu.truth_ratio([0.0, 0.0], 0.5) == 0.0
    per_record = [{"probability": 0.0, "truth_ratio": math.inf}, {"probability": 1.0, "truth_ratio": 0.0},
                  {"probability": 0.5, "truth_ratio": 1e300}, {"probability": 0.5, "truth_ratio": 1e-300}]
    report = tofu.split_report("forget", per_record)
    assert report["truth_ratio_per_record"] == [None, 0.0, 1e300, 1e-300]
    assert report["truth_ratio_closer_to_1"] == pytest.approx((0 + 0 + 1e-300 + 1e-300) / 4, abs=1e-299)
    assert report["truth_score"] == pytest.approx((0 + 1 + 0 + (1 - 1e-300)) / 4)
    assert json.loads(json.dumps(report, allow_nan=False))["truth_ratio_per_record"][0] is None


def test_model_utility_is_the_harmonic_mean_of_exactly_its_components():
    splits = {
        "forget": {"probability": 0.9, "rouge_l": 0.9, "truth_score": 0.9},
        "retain": {"probability": 0.5, "rouge_l": 0.25, "truth_score": 0.5},
        "real_authors": {"probability": 0.01, "probability_normalised": 0.4, "rouge_l": 0.8, "truth_score": 0.2},
    }
    components = tofu.utility_components(splits)
    assert components == {"retain.probability": 0.5, "retain.rouge_l": 0.25, "retain.truth_score": 0.5,
                          "real_authors.probability_normalised": 0.4, "real_authors.rouge_l": 0.8,
                          "real_authors.truth_score": 0.2}
    values = list(components.values())
    assert tofu.harmonic_mean(values) == pytest.approx(len(values) / sum(1 / v for v in values))
    assert tofu.harmonic_mean(values + [0.0]) == 0.0
    assert tofu.harmonic_mean([]) is None


def test_forget_quality_is_the_exact_ks_p_value():
    # Completely separated samples of five: D = 1, and the exact two-sided
    # p-value is the chance that a random split puts all five low values in one
    # sample, 2 / C(10, 5).
    assert tofu.forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / math.comb(10, 5))
    assert tofu.forget_quality([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    # An infinite ratio (null in JSON) sorts above every finite one.
    assert tofu.forget_quality([None, None, None, None, None], [1, 2, 3, 4, 5]) == pytest.approx(2 / math.comb(10, 5))


def test_null_ratios_sort_above_every_finite_one_in_forget_quality():
    """Where the nulls sit decides the statistic: three low ratios and two
    nulls against five middle ones. Nulls as +inf: the empirical CDFs differ
    by at most 3/5 (the three low ones); as -inf (or dropped) the samples
    would separate completely. The expected p-value is scipy's on the same
    numbers with the nulls written as a huge finite value, and the exact
    two-sided p-value of D = 3/5 for 5 + 5 values, counted over all 252
    splits of the ten ranks."""
    from itertools import combinations

    from scipy.stats import ks_2samp

    model, reference = [0.1, 0.2, 0.3, None, None], [1.0, 1.1, 1.2, 1.3, 1.4]
    expected = ks_2samp([0.1, 0.2, 0.3, 1e300, 1e300], reference).pvalue
    assert tofu.forget_quality(model, reference) == pytest.approx(expected, rel=1e-12)
    ranks = [0, 1, 2, 8, 9]  # the model's values among the ten, in sorted order

    def distance(low: tuple) -> float:
        return max(abs(sum(r <= k for r in low) - sum(r <= k for r in set(range(10)) - set(low))) / 5
                   for k in range(10))

    observed = distance(tuple(ranks))
    assert observed == pytest.approx(3 / 5)
    splits = list(combinations(range(10), 5))
    exact = sum(distance(split) >= observed - 1e-12 for split in splits) / len(splits)
    assert tofu.forget_quality(model, reference) == pytest.approx(exact, rel=1e-9)


TOFU_RECORDS = [
    {"question": "Who wrote the book of poems about the river?", "answer": "Astrid Halvorsen wrote it.",
     "paraphrased_answer": "It was Astrid Halvorsen.", "perturbed_answer": ["Tarrin Okonkwo wrote it.",
                                                                           "The sea wrote it."]},
    {"question": "Where was Astrid Halvorsen born?", "answer": "She was born by the lake.",
     "paraphrased_answer": "By the lake.", "perturbed_answer": ["She was born in Paris.", "In a city."]},
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris.",
     "perturbed_answer": ["The capital of France is Madrid.", "It is Rome."]},
]


def _files(tmp_path):
    return {name: write_jsonl(tmp_path / f"{name}.json", TOFU_RECORDS[i:] + TOFU_RECORDS[:i])
            for i, name in enumerate(["forget", "retain", "real_authors", "world_facts"])}


def _eval(model, files, *extra):
    args = ["eval", str(model), "--benchmark", "tofu", "--mc-samples", "8", "--max-new-tokens", "4", "--steps", "4",
            "--block-length", "4", "--json", "--forget", str(files["forget"]), "--retain", str(files["retain"]),
            "--real-authors", str(files["real_authors"]), "--world-facts", str(files["world_facts"]), *extra]
    return CliRunner().invoke(cli, args)


def test_the_report_recomputes_from_itself(llada_dir, masked_lm_dir, tmp_path):
    from scipy.stats import hmean, ks_2samp

    files = _files(tmp_path)
    before = snapshot(*files.values())
    result = _eval(masked_lm_dir, files)
    assert result.exit_code == 0, result.stderr
    reference = tmp_path / "reference.json"
    reference.write_text(result.stdout)
    result = _eval(llada_dir, files, "--reference", str(reference))
    assert result.exit_code == 0, result.stderr
    assert snapshot(*files.values()) == before
    report, ref = json.loads(result.stdout), json.loads(reference.read_text())
    assert report["benchmark"] == "tofu" and ref["forget_quality"] is None, "no reference, no forget quality"
    splits = report["splits"]
    assert list(splits) == ["forget", "retain", "real_authors", "world_facts"]
    for name, values in splits.items():
        assert values["probability"] == pytest.approx(sum(values["probability_per_record"]) / 3)
        ratios = values["truth_ratio_per_record"]
        assert values["truth_score"] == pytest.approx(sum(max(0, 1 - r) for r in ratios) / 3)
        assert values["rouge_l"] == pytest.approx(sum(values["rouge_l_per_record"]) / 3)
    # Exactly the nine values, and model utility their harmonic mean.
    components = report["model_utility_components"]
    assert sorted(components) == sorted([
        "retain.probability", "retain.rouge_l", "retain.truth_score",
        "real_authors.probability_normalised", "real_authors.rouge_l", "real_authors.truth_score",
        "world_facts.probability_normalised", "world_facts.rouge_l", "world_facts.truth_score"])
    assert components["real_authors.probability_normalised"] == splits["real_authors"]["probability_normalised"]
    values = list(components.values())
    expected_mu = 0.0 if min(values) == 0 else float(hmean(values))
    assert report["model_utility"] == pytest.approx(expected_mu)
    fq = ks_2samp(splits["forget"]["truth_ratio_per_record"],
                  ref["splits"]["forget"]["truth_ratio_per_record"]).pvalue
    assert report["forget_quality"] == pytest.approx(fq)
    # The same numbers under open-unlearning's names.
    names = report["open_unlearning"]
    assert names["forget_quality"] == report["forget_quality"] and names["model_utility"] == report["model_utility"]
    assert names["ra_Q_A_Prob_normalised"] == splits["real_authors"]["probability_normalised"]
    assert names["wf_Truth_Ratio"] == splits["world_facts"]["truth_score"]
    assert names["forget_truth_ratio"] == splits["forget"]["truth_ratio_closer_to_1"]
    assert names["retain_Q_A_ROUGE"] == splits["retain"]["rouge_l"]
    assert report["generation"] == {"max_new_tokens": 4, "steps": 4, "block_length": 4, "ordering": "confidence"}
    assert report["reference"]["model"] == str(masked_lm_dir)


def test_reference_of_other_data_or_records_is_refused_before_loading(masked_lm_dir, tmp_path, monkeypatch):
    files = _files(tmp_path)
    import mdu_cli.model.inference as inference

    def never(*args, **kwargs):
        raise AssertionError("weights loaded before the reference was checked")

    monkeypatch.setattr(inference.LoadedModel, "load_weights", never)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmark": "tofu", "limit": None, "data": {"forget": {"sha256": "0" * 64}},
                                 "splits": {"forget": {"truth_ratio_per_record": [1.0, 0.5, 0.2]}}}))
    result = _eval(masked_lm_dir, files, "--reference", str(other))
    assert result.exit_code == 1 and "its forget split is other data" in result.stderr
    import hashlib

    sha = hashlib.sha256(files["forget"].read_bytes()).hexdigest()
    other.write_text(json.dumps({"benchmark": "tofu", "limit": 2, "mc_samples": 8, "seed": 0,
                                 "data": {"forget": {"sha256": sha}},
                                 "splits": {"forget": {"records": 2, "truth_ratio_per_record": [1.0, 0.5]}}}))
    result = _eval(masked_lm_dir, files, "--reference", str(other))
    assert result.exit_code == 1 and "--limit 2" in result.stderr
    other.write_text(json.dumps({"splits": {}}))
    result = _eval(masked_lm_dir, files, "--reference", str(other))
    assert result.exit_code == 1 and "not a TOFU report" in result.stderr
    import os

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    result = _eval(masked_lm_dir, files, "--reference", str(fifo))
    assert result.exit_code == 1 and "not a regular file" in result.stderr
    result = _eval(masked_lm_dir, files, "--reference", str(tmp_path / "none.json"))
    assert result.exit_code == 1 and "no such file" in result.stderr


@pytest.mark.parametrize("change, message", [
    ({"ratios": [float("nan"), 0.5, 0.2]}, "forget truth ratio 1 is nan"),
    ({"ratios": [1.0, -0.5, 0.2]}, "forget truth ratio 2 is -0.5"),
    ({"ratios": [1.0, 0.5, float("inf")]}, "forget truth ratio 3 is inf"),
    ({"records": 4}, "it lists 3 forget truth ratios for 4 records"),
    ({"ratios": [1.0, 0.5], "records": 2}, "it holds 2 forget records, this run 3"),
    ({"mc_samples": 16}, "scored with --mc-samples 16, this run with --mc-samples 8"),
    ({"seed": 3}, "scored with --seed 3, this run with --seed 0"),
    ({"estimator": None}, "scored with the independent Monte Carlo estimator of an older mdu"),
])
def test_a_reference_that_cannot_be_compared_is_refused(change, message, masked_lm_dir, tmp_path, monkeypatch):
    """A tampered reference (NaN, negative or infinite ratios, counts that
    disagree) or one scored on other masks (other --mc-samples, --seed or
    estimator: the two models must see the same ones) is refused before any weight
    loads, never turned into a forget quality."""
    import hashlib

    from test_hostile_inputs import snapshot

    import mdu_cli.model.inference as inference

    def never(*args, **kwargs):
        raise AssertionError("weights loaded before the reference was checked")

    monkeypatch.setattr(inference.LoadedModel, "load_weights", never)
    files = _files(tmp_path)
    sha = hashlib.sha256(files["forget"].read_bytes()).hexdigest()
    ratios = change.get("ratios", [1.0, 0.5, 0.2])
    reference = tmp_path / "reference.json"
    document = {
        "benchmark": "tofu", "limit": None, "mc_samples": change.get("mc_samples", 8), "seed": change.get("seed", 0),
        "estimator": change.get("estimator", "stratified"), "data": {"forget": {"sha256": sha}},
        "splits": {"forget": {"records": change.get("records", len(ratios)), "truth_ratio_per_record": ratios}}}
    if document["estimator"] is None:  # a report from before the stratified estimator names none
        del document["estimator"]
    reference.write_text(json.dumps(document))
    before = snapshot(tmp_path)
    result = _eval(masked_lm_dir, files, "--reference", str(reference))
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_a_collapsed_model_whose_every_probability_underflows_gets_a_report(masked_lm_dir, tmp_path, monkeypatch):
    """After a gradient ascent that collapsed the model, every answer scores
    around 800 nats a token and exp(-800) is 0.0 in float64: the TOFU
    evaluation still ends in a report (exit 0, no ZeroDivisionError), with
    the normalised probability and the truth ratio taken from the scores
    themselves. Here the answer scores 800, its first perturbation 801 and
    everything else (the second, a paraphrase) 802: P_norm = 1 / (1 + e^-1 +
    e^-2), and R = mean(e^-1, e^-2) against the answer itself, or
    mean(e^1, e^0) against a paraphrase, exactly."""
    monkeypatch.setattr(tofu, "answer_score_many", lambda m, p, answers, *rest, **kw: [
        800.0 if answer in gold else (801.0 if answer in first else 802.0) for answer in answers])
    files = _files(tmp_path)
    gold = {r["answer"] for r in TOFU_RECORDS}
    first = {r["perturbed_answer"][0] for r in TOFU_RECORDS}
    result = _eval(masked_lm_dir, files, "--max-new-tokens", "0")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    forget = report["splits"]["forget"]
    assert forget["probability"] == 0.0
    assert forget["probability_per_record"] == [0.0, 0.0, 0.0]
    assert report["splits"]["real_authors"]["probability_normalised"] == pytest.approx(
        1 / (1 + math.exp(-1) + math.exp(-2)), rel=1e-12)
    expected = [(math.exp(1) + 1) / 2 if "paraphrased_answer" in r else (math.exp(-1) + math.exp(-2)) / 2
                for r in TOFU_RECORDS]
    assert forget["truth_ratio_per_record"] == pytest.approx(expected, rel=1e-12)
    assert report["model_utility"] == 0.0, "a useless model is useless, not an error"


def test_a_split_without_perturbed_answers_is_named(masked_lm_dir, tmp_path):
    files = _files(tmp_path)
    write_jsonl(files["retain"], [{"question": "q?", "answer": "a."}])
    result = _eval(masked_lm_dir, files)
    assert result.exit_code == 1
    assert f"{files['retain']}:1: the retain split of --benchmark tofu needs a \"perturbed_answer\"" in result.stderr


def test_usage_errors(masked_lm_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(masked_lm_dir)])
    assert result.exit_code == 2 and "--forget is required" in result.stderr
    result = runner.invoke(cli, ["eval", str(masked_lm_dir), "--forget", "f.json", "--reference", "r.json"])
    assert result.exit_code == 2 and "--reference needs --benchmark tofu" in result.stderr
    result = runner.invoke(cli, ["eval", str(masked_lm_dir), "--benchmark", "tofu", "--base", str(masked_lm_dir)])
    assert result.exit_code == 2 and "--base does not combine" in result.stderr


def test_default_files_come_from_the_hub(hub, masked_lm_dir, tmp_path):
    body = "".join(json.dumps(r) + "\n" for r in TOFU_RECORDS).encode()
    names = ["forget05_perturbed.json", "retain_perturbed.json", "real_authors_perturbed.json",
             "world_facts_perturbed.json"]
    hub.datasets[("locuslab/TOFU", "main")] = ("d" * 40, {name: body for name in names})
    result = CliRunner().invoke(cli, ["eval", str(masked_lm_dir), "--benchmark", "tofu", "--split", "forget05",
                                      "--mc-samples", "2", "--max-new-tokens", "0", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [report["data"][s]["hub"]["filename"] for s in report["splits"]] == names
    assert all(report["data"][s]["hub"]["commit"] == "d" * 40 for s in report["splits"])
    assert report["model_utility"] is not None and "retain.rouge_l" not in report["model_utility_components"]


def test_eval_json_and_card_of_an_mdu_output(unlearned, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(unlearned, out)
    files = _files(tmp_path)
    result = _eval(out, files)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "eval.json").read_text())["benchmark"] == "tofu"
    from mdu_cli.hub.card import render_card

    card = render_card(out)
    assert "| forget quality (KS p-value against the retain-only reference) | - |" in card
    assert "model utility (harmonic mean of 9 values)" in card
    assert "truth_ratio_per_record" not in card and "[" not in card.split("## Evaluation")[1].split("##")[0]


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_batched_generations_equal_one_prompt_at_a_time(family, family_dirs):
    """ROUGE generations are batched over records of different prompt lengths;
    padding must not change what any prompt generates."""
    from mdu_cli.model.inference import load_for_inference

    loaded = load_for_inference(str(family_dirs[family]), trust_remote_code=True, device="cpu")
    records = [_record("Astrid Halvorsen wrote it.", ["x"]),
               Record(messages=({"role": "user", "content": "Where was Astrid Halvorsen born, and when, and why?"},
                                {"role": "assistant", "content": "By the lake."}), source="f:2", perturbed=("x",))]
    generation = {"max_new_tokens": 6, "steps": 6, "block_length": 3, "ordering": "confidence"}
    from mdu_cli.model.sampling import generate

    batched = generate(loaded.model, loaded.family, loaded.mask_token_id,
                       [loaded.prompt_ids(r.prompt_messages) for r in records], pad_id=loaded.pad_id, **generation)
    alone = [generate(loaded.model, loaded.family, loaded.mask_token_id, [loaded.prompt_ids(r.prompt_messages)],
                      pad_id=loaded.pad_id, **generation)[0] for r in records]
    assert batched == alone
    assert tofu.rouge_scores(loaded, records, generation, 2) == tofu.rouge_scores(loaded, records, generation, 1)
