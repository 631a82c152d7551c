"""`mdu eval --benchmark rwku` and `mdu corpus` end to end on tiny models:
the report's aggregates recomputed from its per-probe values, RWKU's files
from a directory and from the (fake) Hub, bad input before any weights load
with the inputs byte-identical, and the corpus's records and determinism."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_hostile_inputs import snapshot

from mdu_cli.cli import cli

EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "rwku" / "data"
TARGET = "elspeth moraine"
FAST = ["--max-new-tokens", "6", "--mc-samples", "4", "--device", "cpu", "--trust-remote-code"]


@pytest.fixture
def rwku_dir(tmp_path) -> Path:
    directory = tmp_path / "rwku"
    shutil.copytree(EXAMPLE_DATA, directory)
    return directory


def _eval(model, rwku_dir, *extra, target=TARGET):
    result = CliRunner().invoke(cli, ["eval", str(model), "--benchmark", "rwku", "--target", target, "--rwku",
                                      str(rwku_dir), "--json", *extra])
    return result


def _mean(values):
    return sum(values) / len(values)


def test_the_report_recomputes_from_its_probes(dream_dir, rwku_dir):
    """Every part at RWKU's own lengths; each aggregate from the per-probe values."""
    from scipy.stats import mannwhitneyu

    before = snapshot(*rwku_dir.rglob("*.json"))
    result = _eval(dream_dir, rwku_dir, "--mc-samples", "4", "--device", "cpu", "--trust-remote-code")
    assert result.exit_code == 0, result.stderr
    assert snapshot(*rwku_dir.rglob("*.json")) == before
    report = json.loads(result.stdout)
    assert report["benchmark"] == "rwku" and report["target"] == TARGET
    assert report["generation"]["max_new_tokens"] == {"forget": 30, "neighbor": 30, "reasoning": 256,
                                                      "factuality": 30, "fluency": 256}
    parts = report["splits"]
    forget = parts["forget"]
    results = forget["results"]
    assert len(results) == 15 and {r["subject"] for r in results} == {TARGET}, "only the target's probes"
    for key in ("query", "answer", "level", "type", "subject", "prediction", "rouge_l_r"):
        assert all(key in r for r in results)
    for level in (1, 2, 3):
        scores = [r["rouge_l_r"] for r in results if str(r["level"]) == str(level)]
        assert forget[f"level_{level}_rouge_l_r"] == pytest.approx(_mean(scores))
    for kind, value in forget["level_3_by_type"].items():
        assert value == pytest.approx(_mean([r["rouge_l_r"] for r in results if r.get("type") == kind]))
    assert len(forget["level_3_by_type"]) == 5
    neighbor = parts["neighbor"]
    assert len(neighbor["results"]) == 12
    mia = parts["mia"]
    for name, count in (("forget_mia", 5), ("retain_mia", 4)):
        rows = mia[name]["results"]
        assert len(rows) == count
        for score in ("loss", "zlib", "mink", "mink++"):
            assert mia[name][score] == pytest.approx(_mean([r[score] for r in rows]))
    for score in ("loss", "zlib", "mink", "mink++"):
        members = [r[score] for r in mia["forget_mia"]["results"]]
        others = [r[score] for r in mia["retain_mia"]["results"]]
        assert mia["auc"][score] == pytest.approx(mannwhitneyu(members, others).statistic / (5 * 4))
    utility = parts["utility"]
    assert utility["general"]["acc"] == _mean([r["prediction"] == r["answer"] for r in utility["general"]["results"]])
    assert utility["reasoning"]["EM"] == _mean([r["em"] for r in utility["reasoning"]["results"]])
    truthful = utility["truthfulness"]["results"]
    assert utility["truthfulness"]["MC1"] == _mean([r["MC1"] for r in truthful])
    for r in truthful:
        scores = r["scores"]["mc2_targets"]
        import math

        true = sum(math.exp(s) for s in scores["true"])
        assert r["MC2"] == pytest.approx(true / (true + sum(math.exp(s) for s in scores["false"])))
        mc1 = r["scores"]["mc1_targets"]
        assert r["MC1"] == float(mc1["true"][0] > max(mc1["false"]))
    assert utility["factuality"]["F1"] == pytest.approx(_mean([r["f1"] for r in utility["factuality"]["results"]]))
    assert utility["fluency"]["entropy"] == pytest.approx(
        _mean([r["entropy"] for r in utility["fluency"]["results"]]))
    table = report["table"]
    assert table["forget All"] == pytest.approx(_mean([forget[f"level_{n}_rouge_l_r"] for n in (1, 2, 3)]))
    assert table["MIA FM"] == mia["forget_mia"]["loss"] and table["MIA AUC"] == mia["auc"]["loss"]
    assert table["Tru"] == utility["truthfulness"]["MC1"] and table["Fac"] == utility["factuality"]["F1"]
    data = report["data"]
    assert data["forget_level1"]["records"] == 5 and data["intro"]["path"].endswith("intro.json")


def test_the_paper_preset_with_a_base_side_by_side(llada_dir, dream_dir, rwku_dir):
    result = _eval(llada_dir, rwku_dir, "--preset", "paper", "--base", str(dream_dir), "--part", "forget",
                   "--part", "utility", *FAST)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["splits"]) == {"forget", "utility"}, "--part runs only those parts"
    assert report["generation"]["preset"] == "paper" and report["generation"]["explicit"] == {"max_new_tokens": 6}
    assert "match" in report["splits"]["utility"]["factuality"], "the paper's TriviaQA is by containment"
    assert all("output" in r for r in report["splits"]["utility"]["general"]["results"]), "MMLU by generated letter"
    base = report["base"]
    assert base["model"] == str(dream_dir) and set(base["splits"]) == {"forget", "utility"}
    for key, value in report["table"].items():
        if value is not None and base["table"][key] is not None:
            assert report["change"][key] == pytest.approx(value - base["table"][key])
    # The paper's prompts: the raw query is the user turn.
    from mdu_cli.evaluation.benchmarks.rwku.prompts import probe_prompt

    assert probe_prompt({"query": "q ?", "level": "2"}, paper=True) == ("q ?", "")
    assert probe_prompt({"query": "q ?", "level": "1"}, paper=False)[0].startswith("Please complete the blank")


def test_eval_json_card_and_push_keep_the_target_out(unlearned, tmp_path):
    """In an mdu output the report is written as eval.json; the card carries
    the RWKU table, and what `mdu push` would publish names neither the
    target nor its probes."""
    from mdu_cli.hub.card import render_card
    from mdu_cli.hub.publication import check_published, encoded, local_names, public_paperwork

    out = tmp_path / "out"
    shutil.copytree(unlearned, out)
    rwku_dir = tmp_path / "rwku"
    shutil.copytree(EXAMPLE_DATA, rwku_dir)
    result = _eval(out, rwku_dir, "--part", "forget", "--part", "mia", *FAST)
    assert result.exit_code == 0, result.stderr
    written = json.loads((out / "eval.json").read_text())
    assert written["table"] == json.loads(result.stdout)["table"]
    card = render_card(out, repo_id="me/x")
    assert "| forget All (mean of the three forget levels) |" in card and "MIA AUC" in card
    assert TARGET not in card
    published, found = public_paperwork(out)
    assert "results" not in published["eval.json"]["splits"]["forget"]
    assert published["eval.json"]["target"] == "(local)"
    texts = {name: encoded(doc).decode() for name, doc in published.items()}
    texts["README.md"] = card
    assert TARGET in local_names(found, out)
    check_published(texts, local_names(found, out))   # nothing names the target
    with pytest.raises(Exception, match="would publish"):
        check_published({"README.md": card + f"\nabout {TARGET}\n"}, local_names(found, out))


@pytest.mark.parametrize("args, message, code", [
    (["--target", "elspeth moran"], "closest: 'elspeth moraine'", 1),
    (["--target", "nobody at all"], "2 targets, e.g.", 1),
    ([], "needs --target", 2),
    (["--target", TARGET, "--forget", "f.jsonl"], "--forget and --retain do not apply", 2),
    (["--target", TARGET, "--max-new-tokens", "0"], "would skip every answer", 2),
])
def test_bad_options_are_one_line_errors_before_loading(args, message, code, dream_dir, rwku_dir, monkeypatch):
    from mdu_cli.model import inference

    monkeypatch.setattr(inference.LoadedModel, "load_weights", lambda self: pytest.fail("weights loaded"))
    before = snapshot(*rwku_dir.rglob("*.json"))
    result = CliRunner().invoke(cli, ["eval", str(dream_dir), "--benchmark", "rwku", "--rwku", str(rwku_dir),
                                      *args, "--trust-remote-code"])
    assert result.exit_code == code and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert snapshot(*rwku_dir.rglob("*.json")) == before


@pytest.mark.parametrize("file, edit, message", [
    ("forget_level2.json", lambda rows: rows[1].pop("answer"), 'forget_level2.json:9: no "answer" field'),
    ("forget_level3.json", lambda rows: rows[0].pop("type"), 'no "type" field'),
    ("retain_mmlu.json", lambda rows: rows[0].update(answer=7), '"answer" (here or in "examples") must be the index'),
    ("truthful.json", lambda rows: rows[0]["mc1_targets"].update(labels=[0, 1]), "lists its true choice first"),
    ("forget_mia.json", lambda rows: rows[0].update(text=3), '"text" is a int'),
    ("neighbor_level1.json", lambda rows: rows[0].pop("subject"), 'neighbor_level1.json:2: no "subject" field'),
])
def test_a_row_lacking_a_field_is_named_by_file_and_line(file, edit, message, dream_dir, rwku_dir, monkeypatch):
    from mdu_cli.model import inference

    path = rwku_dir / "All" / file
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows, indent=1))
    monkeypatch.setattr(inference.LoadedModel, "load_weights", lambda self: pytest.fail("weights loaded"))
    before = snapshot(*rwku_dir.rglob("*.json"))
    result = _eval(dream_dir, rwku_dir, "--trust-remote-code")
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert file in result.stderr and "Traceback" not in result.stderr
    assert snapshot(*rwku_dir.rglob("*.json")) == before


def test_a_missing_file_or_directory_is_named(dream_dir, rwku_dir):
    (rwku_dir / "All" / "retain_bbh.json").unlink()
    result = _eval(dream_dir, rwku_dir, "--trust-remote-code")
    assert result.exit_code == 1 and "retain_bbh.json: no such file" in result.stderr
    result = _eval(dream_dir, rwku_dir, "--trust-remote-code", "--part", "forget")
    assert result.exit_code == 0, "a part that does not need the file runs"
    result = _eval(dream_dir, rwku_dir / "nope", "--trust-remote-code")
    assert result.exit_code == 1 and "no such directory" in result.stderr


def test_rwku_from_the_hub_with_its_commit_and_offline_cache(hub, dream_dir, monkeypatch):
    import huggingface_hub.constants

    commit = "c" * 40
    hub.datasets[("jinzhuoran/RWKU", "main")] = (commit, {f"All/{p.name}": p.read_bytes()
                                                          for p in (EXAMPLE_DATA / "All").iterdir()})
    args = ["eval", str(dream_dir), "--benchmark", "rwku", "--target", TARGET, "--part", "forget", "--json", *FAST]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rwku"] == {"source": "hf://datasets/jinzhuoran/RWKU", "repo_id": "jinzhuoran/RWKU",
                              "revision": None, "commit": commit}
    assert report["data"]["forget_level1"]["hub"]["filename"] == "All/forget_level1.json"
    asked = len(hub.requests)
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reset_sessions()  # sessions read the offline switch when they are made
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.stderr
    assert len(hub.requests) == asked, "offline: read from the cache, no request"
    result = CliRunner().invoke(cli, [*args[:6], "--rwku", "hf://datasets/jinzhuoran/RWKU@v9", *args[6:]])
    assert result.exit_code == 1 and "not in the Hugging Face cache" in result.stderr, result.stderr


def test_a_malformed_hub_source_is_a_usage_error(dream_dir):
    result = _eval(dream_dir, "hf://datasets/only-owner", "--trust-remote-code")
    assert result.exit_code == 2 and "expected hf://datasets/OWNER/NAME[@REVISION]" in result.stderr


# ---- mdu corpus ----------------------------------------------------------------------------------------------

def _corpus(model, rwku_dir, out, *extra):
    return CliRunner().invoke(cli, ["corpus", "--model", str(model), "--target", TARGET, "--rwku", str(rwku_dir),
                                    "--out", str(out), "--samples", "5", "--max-new-tokens", "8",
                                    "--batch-size", "2", "--device", "cpu", "--trust-remote-code", *extra])


def test_the_corpus_is_records_for_unlearn_and_the_same_for_the_same_seed(dream_dir, rwku_dir, tmp_path):
    from mdu_cli.data.records import load_dataset

    before = snapshot(*rwku_dir.rglob("*.json"), *dream_dir.iterdir())
    first, second, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    for out, seed in ((first, "0"), (second, "0"), (other, "1")):
        result = _corpus(dream_dir, rwku_dir, out, "--seed", seed)
        assert result.exit_code == 0, result.stderr
    assert snapshot(*rwku_dir.rglob("*.json"), *dream_dir.iterdir()) == before
    assert first.read_bytes() == second.read_bytes(), "the same seed writes the same file"
    assert first.read_bytes() != other.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert 1 <= len(rows) <= 5 and all(set(r) == {"prompt", "completion"} for r in rows)
    assert rows[0]["prompt"] == f"Please write a short biography of {TARGET}."
    assert len(load_dataset(first)) == len(rows), "ready for mdu unlearn --forget"
    meta = json.loads((tmp_path / "a.jsonl.meta.json").read_text())
    assert meta["written_by"] == "mdu corpus" and meta["target"] == TARGET
    assert meta["settings"]["top_p"] == 0.9 and meta["settings"]["temperature"] == 1.0
    assert meta["settings"]["seed"] == 0 and meta["rwku"] == {"source": str(rwku_dir)}
    assert meta["records"] + meta["empty_samples"] == 5
    import hashlib

    assert meta["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()


def test_the_corpus_never_replaces_a_file_it_did_not_write(dream_dir, rwku_dir, tmp_path, monkeypatch):
    from mdu_cli.model import inference

    mine = tmp_path / "notes.jsonl"
    mine.write_text("my own notes\n")
    monkeypatch.setattr(inference.LoadedModel, "load_weights", lambda self: pytest.fail("weights loaded"))
    for extra in ([], ["--overwrite"]):
        result = _corpus(dream_dir, rwku_dir, mine, *extra)
        assert result.exit_code == 1 and "is not a corpus mdu wrote" in result.stderr
    assert mine.read_text() == "my own notes\n"
    result = _corpus(dream_dir, rwku_dir, tmp_path / "x.jsonl", "--target", "elspeth moran")
    assert result.exit_code == 1 and "closest: 'elspeth moraine'" in result.stderr
    for inside in (dream_dir / "corpus.jsonl", rwku_dir / "All" / "corpus.jsonl"):
        result = _corpus(dream_dir, rwku_dir, inside)
        assert result.exit_code == 1 and "which this command reads" in result.stderr and not inside.exists()
    result = _corpus(dream_dir, rwku_dir, tmp_path / "x.jsonl", "--top-p", "0")
    assert result.exit_code == 2
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.jsonl.meta.json").exists()


def test_a_corpus_it_wrote_is_replaced_only_with_overwrite(dream_dir, rwku_dir, tmp_path):
    out = tmp_path / "c.jsonl"
    assert _corpus(dream_dir, rwku_dir, out).exit_code == 0
    result = _corpus(dream_dir, rwku_dir, out, "--seed", "3")
    assert result.exit_code == 1 and "pass --overwrite" in result.stderr
    assert _corpus(dream_dir, rwku_dir, out, "--seed", "3", "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "c.jsonl.meta.json").read_text())["settings"]["seed"] == 3


def test_generations_are_read_as_rwku_reads_them(monkeypatch):
    """What the model wrote, to what is scored: a probe's answer ends at the
    first newline (empty: NOANSWER); BBH's is what follows 'the answer is';
    TriviaQA's whole output is matched against every answer."""
    from mdu_cli.evaluation.benchmarks.rwku import evaluate

    outputs = iter([["amberlyn\nquestion : more", "\n", "  the burning orchard  "],
                    ["so the answer is purple. then", "no marker"],
                    ["The Burning Orchard!"]])
    monkeypatch.setattr(evaluate, "_generate", lambda *args, **kwargs: next(outputs))
    rows = [{"query": "q", "answer": a, "level": "2", "subject": "s"}
            for a in ("amberlyn", "amberlyn", "the burning orchard")]
    forget = evaluate.probe_part(None, {"forget_level2": rows}, {"forget_level2": [[1]] * 3}, ["forget_level2"],
                                 {}, False, 8, False, "forget")
    assert [r["prediction"] for r in forget["results"]] == ["amberlyn", "NOANSWER", "the burning orchard"]
    assert [r["rouge_l_r"] for r in forget["results"]] == [1.0, 0.0, 1.0]
    assert forget["level_2_rouge_l_r"] == pytest.approx(2 / 3)
    bbh = evaluate.reasoning(None, [{"question": "q", "answer": "purple", "subject": "s"},
                                    {"question": "q", "answer": ["no marker", "x"], "subject": "s"}], [[1], [1]],
                             {}, 8, False)
    assert [r["prediction"] for r in bbh["results"]] == ["purple", "no marker"] and bbh["EM"] == 1.0
    trivia = evaluate.factuality(None, [{"question": "q", "answers": ["x", "the burning orchard"], "subject": "s"}],
                                 [[1]], {}, False, 8, False)
    assert trivia["EM"] == 1.0 and trivia["F1"] == 1.0


def test_every_choice_of_a_question_is_scored_on_the_same_mask_draws(dream_dir):
    """Common random numbers: two choices that tokenise alike get the same
    log-likelihood exactly, which independent draws would not give."""
    from mdu_cli.evaluation.benchmarks.rwku import evaluate
    from mdu_cli.model.inference import load_for_inference

    loaded = load_for_inference(str(dream_dir), trust_remote_code=True, device="cpu")
    targets = {"choices": ["the cat was born in paris", "the cat was born  in paris", "no"], "labels": [1, 0, 0]}
    row = {"question": "q", "subject": "s", "mc1_targets": targets, "mc2_targets": targets}
    prompt = evaluate.Prompts(loaded)("where was the cat born ?", "A:")
    [result] = evaluate.truthfulness(loaded, [row], [prompt], 16, 0, 8, False)["results"]
    true, false = result["scores"]["mc1_targets"]["true"], result["scores"]["mc1_targets"]["false"]
    assert true[0] == false[0] and false[0] != false[1]


def test_aggregate_means_over_targets_per_tau(tmp_path):
    """examples/rwku/aggregate.py: one row per tau, the mean over targets;
    the original once per target, however many taus sit beside it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aggregate", EXAMPLE_DATA.parent / "aggregate.py")
    aggregate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aggregate)
    reports = []
    for target, base_value, values in (("a", 0.8, {"1": 0.2, "2": 0.4}), ("b", 0.6, {"1": 0.4, "2": 0.0})):
        for tau, value in values.items():
            model = tmp_path / f"{target}-{tau}"
            model.mkdir()
            (model / "mdu_run.json").write_text(json.dumps({"config": {"method": "mdu", "tau": float(tau)}}))
            reports.append({"benchmark": "rwku", "target": target, "model": str(model),
                            "table": {"forget All": value, "Gen": None},
                            "base": {"table": {"forget All": base_value, "Gen": None}}})
    paths = []
    for i, report in enumerate(reports):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report))
    table = aggregate.main([str(p) for p in paths])
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines()[2:]}
    assert rows[("original", "-")].endswith("| 2 | 0.700 |")
    assert rows[("mdu", "1.0")].endswith("| 2 | 0.300 |") and rows[("mdu", "2.0")].endswith("| 2 | 0.200 |")
    assert "Gen" not in table, "a measure no report has is left out"


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_batched_single_position_scores_equal_one_prompt_at_a_time(family, family_dirs):
    """Prompts of different lengths padded into one batch score as alone: the
    padding is hidden from every family's attention."""
    from mdu_cli.evaluation.likelihood import next_token_log_probs
    from mdu_cli.model.inference import load_for_inference

    loaded = load_for_inference(str(family_dirs[family]), trust_remote_code=True, device="cpu")
    prompts = [loaded.prompt_ids([{"role": "user", "content": text}]) for text in
               ("where was the cat born ?", "who", "what did the father of the young painter do in paris ?")]
    together = next_token_log_probs(loaded, prompts, [5, 6, 7], batch_size=3)
    alone = [next_token_log_probs(loaded, [p], [5, 6, 7], batch_size=1)[0] for p in prompts]
    for got, want in zip(together, alone):
        assert got == pytest.approx(want, abs=1e-5)


def test_multiple_choice_accuracy_by_hand(monkeypatch):
    """RWKU's MMLU: the most likely of the row's own choice letters, rows with
    different numbers of choices scored apart; accuracy the share right."""
    from mdu_cli.evaluation.benchmarks.rwku import evaluate

    letters = {3: [10, 11, 12], 4: [10, 11, 12, 13]}
    scores = {(1,): [-3.0, -0.5, -2.0, -9.0], (2,): [-1.0, -2.0, -3.0, -0.1], (3,): [-5.0, -4.0, -0.2]}
    monkeypatch.setattr(evaluate, "_letter_candidates", lambda loaded, count: letters[count])

    def fake_scores(loaded, prompts, candidates, batch_size):
        assert all(len(scores[tuple(p)]) == len(candidates) for p in prompts), "each group has its own letters"
        return [scores[tuple(p)] for p in prompts]

    monkeypatch.setattr(evaluate, "next_token_log_probs", fake_scores)
    rows = [{"question": "q1", "choices": list("abcd"), "answer": 1, "subject": "s"},
            {"question": "q2", "choices": list("abcd"), "answer": 0, "subject": "s"},
            {"question": "q3", "choices": list("abc"), "answer": 2, "subject": "s"}]
    report = evaluate.general(None, rows, [[1], [2], [3]], {}, False, 8, False)
    assert [r["prediction"] for r in report["results"]] == [1, 3, 2]   # argmax of each row's scores
    assert report["acc"] == pytest.approx(2 / 3)


def test_the_paper_preset_lengths_and_a_model_too_short_for_a_part(dream_dir, rwku_dir):
    result = _eval(dream_dir, rwku_dir, "--preset", "paper", "--part", "utility", "--mc-samples", "4",
                   "--device", "cpu", "--trust-remote-code")
    assert result.exit_code == 0, result.stderr
    lengths = json.loads(result.stdout)["generation"]["max_new_tokens"]
    assert lengths["general"] == 64 and lengths["factuality"] == 64 and lengths["reasoning"] == 256
    demo = EXAMPLE_DATA.parents[1] / "demo" / "model"
    result = _eval(demo, rwku_dir, "--part", "utility", "--device", "cpu")
    assert result.exit_code == 1 and "more than the 64 positions" in result.stderr
    assert "leave that --part out" in result.stderr and len(result.stderr.strip().splitlines()) == 1
