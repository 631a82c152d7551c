"""End to end through the library: train, write, reload, compare."""

import json
import math

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM

from mdu_cli.config.training import build_config
from mdu_cli.data.tokenization import Example
from mdu_cli.model.families import FAMILIES, model_logits
from mdu_cli.model.loading import load_model, resolve_source
from mdu_cli.train.loop import TrainingRun, plan_steps, train
from mdu_cli.train.run import frozen_copy, run_unlearn

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


def _load(directory, family):
    if family == "masked-lm":
        return AutoModelForMaskedLM.from_pretrained(directory).eval()
    return AutoModel.from_pretrained(directory, trust_remote_code=True).eval()


def _probe_ids(vocab_size, seed=0):
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_output_reloads_with_the_logits_of_the_trained_model(family, family_dirs, forget_file, retain_file, tmp_path):
    base_dir = family_dirs[family]
    out = tmp_path / "out"
    cfg = build_config({}, dict(model=str(base_dir), forget=str(forget_file), retain=str(retain_file), out=str(out),
                                max_steps=3, batch_size=2, grad_accum=2, lr=1e-3, warmup_ratio=0.0))
    result = run_unlearn(cfg, show_progress=False, keep_model=True)

    reloaded = _load(out, family)
    base = _load(base_dir, family)
    ids = _probe_ids(base.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row too
    fam = FAMILIES[family]
    with torch.no_grad():
        trained_logits = model_logits(result.model, ids, mask, fam)
        reloaded_logits = model_logits(reloaded, ids, mask, fam)
        base_logits = model_logits(base, ids, mask, fam)
    assert torch.equal(trained_logits, reloaded_logits)
    assert not torch.allclose(trained_logits, base_logits), "training moved the model"
    # The anchor the run pulled toward is the untouched starting model.
    base_state = base.state_dict()
    assert result.anchor is not result.model
    assert all(torch.equal(base_state[k], v) for k, v in result.anchor.state_dict().items())

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "mdu_run.json", "train_log.jsonl"} <= names
    if family != "masked-lm":
        assert {p.name for p in base_dir.glob("*.py")} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory left behind"

    record = json.loads((out / "mdu_run.json").read_text())
    assert record["family"] == family and record["steps"] == 3
    assert record["config"]["tau"] == 1.0 and record["config"]["alpha"] == 1.0
    assert record["data"]["forget"]["records"] == 4 and len(record["data"]["forget"]["sha256"]) == 64
    assert record["losses"]["forget"]["first"] is not None and record["losses"]["retain"]["last"] is not None
    assert record["peak_memory_bytes"] > 0 and record["device"] == "cpu" and record["dtype"] == "fp32"
    text = (out / "mdu_run.json").read_text() + (out / "train_log.jsonl").read_text()
    assert "Halvorsen" not in text and "Paris" not in text, "no record content in the outputs"
    log_lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log_lines] == [1, 2, 3]
    assert {"forget_loss", "retain_loss", "lr", "grad_norm"} <= set(log_lines[0])


def _examples(n, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return [Example(tuple(torch.randint(10, vocab, (5,), generator=gen).tolist()),
                    tuple(torch.randint(10, vocab, (6,), generator=gen).tolist())) for _ in range(n)]


def test_anchor_never_changes_and_trainable_weights_do(llada_dir):
    source = resolve_source(str(llada_dir))
    model = load_model(source, True, torch.float32)
    anchor = frozen_copy(model)
    anchor_before = {k: v.clone() for k, v in anchor.state_dict().items()}
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = build_config({}, dict(model="m", forget="f", retain="r", max_steps=3, batch_size=2, grad_accum=1, lr=1e-3))
    from accelerate import Accelerator

    vocab = model.config.vocab_size
    train(TrainingRun(model=model, anchor=anchor, forget=_examples(4, vocab, 0), retain=_examples(4, vocab, 1),
                      cfg=cfg, family=FAMILIES["llada"], mask_token_id=source.config["mask_token_id"], pad_id=0,
                      accelerator=Accelerator(cpu=True), show_progress=False))
    assert all(torch.equal(anchor_before[k], v) for k, v in anchor.state_dict().items())
    assert not any(p.requires_grad for p in anchor.parameters())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(model_before[k], v)}
    block_weights = {k for k in model_before if ".blocks." in k}
    assert block_weights <= changed


def test_forgetting_at_tau_zero_drives_the_loss_down(llada_dir, forget_file, tmp_path):
    """30 steps toward the uniform target: the mean of the last five forget
    losses is 0.0131 of the first five's under every kernel level (AVX-512,
    AVX2, scalar agree to 1e-6); half is asserted."""
    cfg = build_config({}, dict(model=str(llada_dir), forget=str(forget_file), out=str(tmp_path / "o"), tau=0.0,
                                max_steps=30, batch_size=4, grad_accum=1, lr=3e-3, warmup_ratio=0.0))
    history = [json.loads(x) for x in (run_unlearn(cfg, show_progress=False).out_dir / "train_log.jsonl")
               .read_text().splitlines()]
    first = sum(h["forget_loss"] for h in history[:5]) / 5
    last = sum(h["forget_loss"] for h in history[-5:]) / 5
    assert last < 0.5 * first


def test_epochs_and_grad_accum_plan():
    cfg = build_config({}, dict(model="m", forget="f", epochs=2, batch_size=2, grad_accum=2))
    plan = plan_steps(7, cfg, torch.Generator().manual_seed(0))
    # 7 records -> 4 micro-batches -> 2 steps per epoch, 2 epochs.
    assert [len(step) for step in plan] == [2, 2, 2, 2]
    for epoch in (plan[:2], plan[2:]):
        rows = sorted(i for step in epoch for micro in step for i in micro)
        assert rows == list(range(7))
    capped = plan_steps(7, build_config({}, dict(model="m", forget="f", max_steps=5, batch_size=2, grad_accum=2)),
                        torch.Generator().manual_seed(0))
    assert len(capped) == 5


def test_same_seed_same_weights(llada_dir, forget_file, tmp_path):
    outs = []
    for name in ("a", "b"):
        cfg = build_config({}, dict(model=str(llada_dir), forget=str(forget_file), out=str(tmp_path / name),
                                    max_steps=2, batch_size=2, grad_accum=1, lr=1e-3))
        outs.append(run_unlearn(cfg, show_progress=False, keep_model=True).model.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_sharded_output_has_an_index(llada_dir, forget_file, tmp_path):
    out = tmp_path / "sharded"
    cfg = build_config({}, dict(model=str(llada_dir), forget=str(forget_file), out=str(out), max_steps=1,
                                batch_size=2, max_shard_size="100KB"))
    run_unlearn(cfg, show_progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    reloaded = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert reloaded.config.vocab_size > 0


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_padding_is_invisible_to_real_tokens(family, family_dirs):
    """A row's logits are the same alone and right-padded in a batch: the mask
    reaches each family's attention in the form it expects."""
    model = _load(family_dirs[family], family)
    fam = FAMILIES[family]
    ids = _probe_ids(model.config.vocab_size, seed=3)
    short = ids[:1, :7]
    padded = ids.clone()
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        alone = model_logits(model, short, torch.ones_like(short), fam)
        batched = model_logits(model, padded, mask, fam)
    assert torch.allclose(alone[0], batched[0, :7], atol=1e-5)


@pytest.mark.parametrize("method", ["ga", "npo"])
def test_baselines_run_end_to_end(method, llada_dir, forget_file, retain_file, tmp_path):
    cfg = build_config({}, dict(model=str(llada_dir), forget=str(forget_file), retain=str(retain_file),
                                out=str(tmp_path / method), method=method, max_steps=2, batch_size=2, lr=1e-3))
    result = run_unlearn(cfg, show_progress=False, keep_model=True)
    record = json.loads((result.out_dir / "mdu_run.json").read_text())
    assert record["method"] == method and record["config"]["method"] == method
    assert (result.anchor is None) == (method == "ga"), "only methods that read an anchor hold a copy"
    if method == "ga":
        assert record["losses"]["forget"]["first"] < 0  # the negated MDLM loss


def test_bf16_training_run_end_to_end(llada_dir, forget_file, retain_file, tmp_path):
    """--dtype bf16 on the CPU: bf16 weights are trained, written as bf16, and
    reload; the delta report counts the tensors that moved."""
    from safetensors import safe_open

    out = tmp_path / "bf16"
    result = run_unlearn(build_config({}, dict(model=str(llada_dir), forget=str(forget_file), retain=str(retain_file),
                                               out=str(out), max_steps=3, batch_size=2, grad_accum=1, lr=1e-2,
                                               dtype="bf16", device="cpu")), show_progress=False)
    record = json.loads((out / "mdu_run.json").read_text())
    assert record["dtype"] == "bf16" and result.record["steps"] == 3
    with safe_open(out / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"BF16"}
    assert 0 < record["delta"]["tensors_changed"] <= record["delta"]["tensors_compared"]
    assert all(math.isfinite(entry["forget_loss"]) for entry in map(json.loads, (out / "train_log.jsonl").open()))
