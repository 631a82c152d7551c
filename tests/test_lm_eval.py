"""lm-evaluation-harness through the `mdu` model: the likelihoods against hand
and estimator computations, generation's stops, batching, and tasks defined
locally (lm-eval's own YAML over JSONL files) through `simple_evaluate`,
`mdu eval --tasks` and `mdu-lm-eval`. Nothing downloads."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_evaluation import TableModel, _loaded

from mdu_cli.cli import cli
from mdu_cli.evaluation.likelihood import answer_scores, mc_masks

MC = [{"question": "where was the cat born ?", "choices": ["paris", "rome", "madrid"], "answer": 0},
      {"question": "who is the father ?", "choices": ["a farmer", "the young teacher"], "answer": 1},
      {"question": "what color is the sea ?", "choices": ["blue", "red", "green", "black"], "answer": 0}]
GEN = [{"question": "capital of france ?", "answer": "paris"}, {"question": "capital of spain ?", "answer": "madrid"}]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two tasks in lm-eval's YAML, over local JSONL files: multiple choice and generate-until."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, rows in (("mc", MC), ("gen", GEN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (root / "mdu_mc.yaml").write_text(
        "task: mdu_mc\n" + data.format(root / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    (root / "mdu_gen.yaml").write_text(
        "task: mdu_gen\n" + data.format(root / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
        "metric_list:\n  - metric: exact_match\nmetadata:\n  version: 2.0\n")
    return root


class Request:
    def __init__(self, *args):
        self.args = args


def _lm(loaded, **kwargs):
    from mdu_cli.evaluation.harness.model import MduLM

    return MduLM(loaded=loaded, show_progress=False, **kwargs)


class MaskAwareModel(TableModel):
    """TableModel whose logits also change, token by token, where the input
    holds the mask (id 0): a scorer that forgot to mask gives other numbers."""

    def forward(self, input_ids, attention_mask=None):
        logits = super().forward(input_ids, attention_mask).logits
        bonus = torch.linspace(-1.0, 1.0, logits.shape[-1])
        return type("Output", (), {"logits": logits + (input_ids == 0).unsqueeze(-1).float() * bonus})()


def _table_lm(family, table, **kwargs):
    loaded = _loaded(MaskAwareModel(table, reads_input=True), family)
    loaded.tokenizer = type("T", (), {"pad_token_id": 0, "eos_token_id": 0, "bos_token_id": None})()
    return _lm(loaded, **kwargs)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_single_token_continuation_is_exact(family):
    """One masked position after the context; Dream reads it one position back."""
    table = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    lm = _table_lm(family, table)
    context, token = [3, 4, 5], 7
    [(value, greedy)] = lm._loglikelihood_tokens([(None, context, [token])])
    tokens = np.array(context + [0])                      # the answer's position holds the mask (id 0)
    at = len(context) - (1 if family == "dream" else 0)
    row = table.double().numpy()[at] + 0.01 * tokens[at] + (tokens[at] == 0) * np.linspace(-1.0, 1.0, 9)
    log_probs = row - np.log(np.exp(row).sum())
    assert value == pytest.approx(log_probs[token], rel=1e-6)
    assert greedy == (int(np.argmax(log_probs)) == token)


@pytest.mark.numerics
def test_a_multi_token_continuation_is_the_projects_estimator_under_the_same_seed():
    table = torch.randn(14, 9, generator=torch.Generator().manual_seed(1))
    lm = _table_lm("llada", table, mc_samples=24, seed=5)
    context, continuation = [3, 4], [6, 7, 8, 2]
    [(value, _)] = lm._loglikelihood_tokens([(None, context, continuation)])
    masks = mc_masks(len(continuation), 24, torch.Generator().manual_seed(5))
    scores = answer_scores(lm.loaded, context, continuation, masks)
    assert value == pytest.approx(-len(continuation) * float(np.mean(scores)), rel=1e-5)


@pytest.mark.numerics
def test_is_greedy_means_every_token_is_the_argmax_with_all_masked():
    table = torch.full((10, 9), -5.0)
    for position in range(10):
        table[position, position % 9] = 5.0      # position p is sure of token p
    lm = _table_lm("llada", table * 1.0, mc_samples=4)
    lm.loaded.model.reads_input = False
    [(_, yes), (_, no)] = lm._loglikelihood_tokens([(None, [1, 1], [2, 3]), (None, [1, 1], [2, 4])])
    assert yes and not no


@pytest.mark.numerics
def test_batching_gives_the_numbers_of_one_request_at_a_time(dream_dir):
    from mdu_cli.model.inference import load_for_inference

    loaded = load_for_inference(str(dream_dir), trust_remote_code=True, device="cpu")
    requests = [(None, [5, 6, 7, 8, 9], [10]), (None, [5], [11, 12, 13]), (None, [5, 6, 7], [14, 15]),
                (None, [9, 9, 9, 9, 9, 9, 9], [16])]
    together = _lm(loaded, mc_samples=6, batch_size=16)._loglikelihood_tokens(requests)
    alone = [_lm(loaded, mc_samples=6, batch_size=1)._loglikelihood_tokens([r])[0] for r in requests]
    for (a, ga), (b, gb) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_generate_until_stops_at_until_and_max_gen_toks():
    class WordTokenizer:
        pad_token_id, eos_token_id, bos_token_id = 0, 1, None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [2] * len(text.split())}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"w{i}" for i in ids)

    table = torch.full((40, 60), -5.0)
    for position in range(40):
        table[position, 20 + position] = 5.0     # position p writes token 20 + p
    loaded = _loaded(TableModel(table), "llada")
    loaded.tokenizer = WordTokenizer()
    loaded.stop_ids = lambda: [1]
    lm = _lm(loaded)
    out = lm.generate_until([Request("a b c", {"until": ["w25"], "max_gen_toks": 8}),
                             Request("a b c", {"until": "never", "max_gen_toks": 4}),
                             Request("a", {"until": [], "max_gen_toks": 3})])
    assert out[0] == "w23 w24 "                      # prompt of 3 tokens: the answer starts at position 3
    assert out[1] == "w23 w24 w25 w26" and out[2] == "w21 w22 w23"


def test_local_tasks_through_simple_evaluate(dream_dir, task_dir):
    from lm_eval import simple_evaluate

    from mdu_cli.evaluation.harness import task_manager
    from mdu_cli.evaluation.harness.model import MduLM

    lm = MduLM(pretrained=str(dream_dir), trust_remote_code=True, device="cpu", mc_samples=8, show_progress=False)
    output = simple_evaluate(model=lm, tasks=["mdu_mc", "mdu_gen"], task_manager=task_manager(str(task_dir)),
                             bootstrap_iters=0)
    results = output["results"]
    assert 0.0 <= results["mdu_mc"]["acc,none"] <= 1.0 and 0.0 <= results["mdu_gen"]["exact_match,none"] <= 1.0
    assert output["versions"]["mdu_mc"] == 1.0 and output["versions"]["mdu_gen"] == 2.0


def test_mdu_eval_tasks_with_a_base_and_the_card(unlearned, llada_dir, task_dir, tmp_path):
    import shutil

    from mdu_cli.hub.card import render_card

    out = tmp_path / "out"
    shutil.copytree(unlearned, out)
    result = CliRunner().invoke(cli, ["eval", str(out), "--tasks", "mdu_mc,mdu_gen", "--include-path", str(task_dir),
                                      "--base", str(llada_dir), "--mc-samples", "8", "--device", "cpu",
                                      "--trust-remote-code", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    harness = report["lm_eval"]
    assert harness["tasks"] == ["mdu_mc", "mdu_gen"] and harness["limit"] == 2
    assert harness["model"]["versions"]["mdu_gen"] == 2.0 and "mdu_mc" in harness["base"]["results"]
    assert harness["lm_eval_version"].startswith("0.4")
    assert json.loads((out / "eval.json").read_text())["lm_eval"]["model"] == harness["model"]
    card = render_card(out, repo_id="me/x")
    assert "lm-evaluation-harness 0.4" in card and "| mdu_mc | 1.0 | acc |" in card
    table = CliRunner().invoke(cli, ["eval", str(llada_dir), "--tasks", "mdu_mc", "--include-path", str(task_dir),
                                     "--mc-samples", "4", "--device", "cpu", "--trust-remote-code", "--limit", "1"])
    assert table.exit_code == 0 and "mdu_mc" in table.stdout and "acc" in table.stdout


def test_mdu_lm_eval_is_lm_evals_command_line_with_the_mdu_model(dream_dir, task_dir, monkeypatch, capsys):
    from mdu_cli.evaluation.harness import cli as harness_cli

    monkeypatch.setattr(sys, "argv", ["mdu-lm-eval", "--model", "mdu", "--model_args",
                                      f"pretrained={dream_dir},trust_remote_code=True,mc_samples=4", "--device", "cpu",
                                      "--tasks", "mdu_mc", "--include_path", str(task_dir), "--limit", "1"])
    harness_cli.main()
    assert "mdu_mc" in capsys.readouterr().out


def test_an_unknown_task_or_a_missing_extra_is_named_before_loading(dream_dir, task_dir, monkeypatch):
    import builtins

    from mdu_cli.model import inference

    monkeypatch.setattr(inference.LoadedModel, "load_weights", lambda self: pytest.fail("weights loaded"))
    result = CliRunner().invoke(cli, ["eval", str(dream_dir), "--tasks", "mdu_mcq", "--include-path", str(task_dir),
                                      "--trust-remote-code"])
    assert result.exit_code == 2 and "no task 'mdu_mcq' (closest: mdu_mc" in result.stderr, result.stderr
    result = CliRunner().invoke(cli, ["eval", str(dream_dir), "--num-fewshot", "2"])
    assert result.exit_code == 2 and "need --tasks" in result.stderr
    real_import = builtins.__import__

    def without_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_lm_eval)
    result = CliRunner().invoke(cli, ["eval", str(dream_dir), "--tasks", "mmlu", "--trust-remote-code"])
    assert result.exit_code == 1 and "pip install 'mdu-cli[lm-eval]'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_chat_template_option_renders_prompts_through_the_model_template(dream_dir, task_dir):
    from mdu_cli.evaluation.harness.model import MduLM

    lm = MduLM(pretrained=str(dream_dir), trust_remote_code=True, device="cpu", show_progress=False)
    rendered = lm.apply_chat_template([{"role": "user", "content": "where was the cat born ?"}])
    assert "<|im_start|>user" in rendered and rendered.rstrip().endswith("<|im_start|>assistant")
    assert lm.tok_encode(rendered)[:1] == [lm.tokenizer.convert_tokens_to_ids("<|im_start|>")], \
        "the template's markup is read as its special tokens"
    result = CliRunner().invoke(cli, ["eval", str(dream_dir), "--tasks", "mdu_mc", "--include-path", str(task_dir),
                                      "--apply-chat-template", "--mc-samples", "4", "--limit", "1", "--device", "cpu",
                                      "--trust-remote-code", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["lm_eval"]["apply_chat_template"] is True


def test_the_lm_eval_extra_is_the_set_these_tests_run_on():
    """The extra's pins (as the installed package declares them) hold for what
    is installed here, the test extra installs the same set on a fresh
    machine, and that set imports beside transformers."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    declared = [Requirement(r) for r in requires("mdu-cli")]

    def extra(name):
        return [r for r in declared if r.marker is not None and r.marker.evaluate({"extra": name})]

    pins = extra("lm-eval")
    assert {p.name for p in pins} == {"lm-eval", "datasets"}
    test_pins = {(r.name, str(r.specifier)) for r in extra("test")}
    for pin in pins:
        assert pin.specifier.contains(version(pin.name)), f"{pin.name} {version(pin.name)} is outside {pin}"
        assert (pin.name, str(pin.specifier)) in test_pins, "the test extra installs the same set"
    assert any(p.name == "datasets" and not p.specifier.contains("5.0.0") for p in pins), "datasets 5 breaks hub < 1"
    import lm_eval  # noqa: F401
    import transformers  # noqa: F401  (datasets 5 would have pulled a huggingface-hub that breaks this import)
