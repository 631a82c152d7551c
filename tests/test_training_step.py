"""The training loop's wiring, checked against a float64 re-implementation of
one optimizer step written here, independently of the package.

The loop runs one step (two forget micro-batches of two rows, each paired with
a retain micro-batch) on a tiny LLaDA-like or Dream-like model. The noised
batches it draws are recorded (their masks are random, so the reference must
see the same ones); everything else is rebuilt here in float64 from the
records and the starting weights: the anchor's input (prompt masked, by
prompt length, not by the package's mask tensor), the alignment of Dream's
logits, the forget loss (MDU with eta > 0, GA, NPO), the retain loss with its
weight alpha and the family's weighting (1/t, or CART computed by explicit
sums), the division over micro-batches, gradient clipping, the warmup's
learning rate and the AdamW update. The gradient of every parameter before
clipping and every parameter after the step must match.
"""

import copy
import math

import pytest
import torch
from accelerate import Accelerator
from conftest import FORGET_RECORDS, RETAIN_RECORDS, write_jsonl

from mdu_cli.config.training import FinetuneConfig, build_config
from mdu_cli.data.records import load_dataset
from mdu_cli.data.tokenization import encode_dataset
from mdu_cli.model.families import FAMILIES
from mdu_cli.train import loop as train_module

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics

LR, ALPHA, TAU, ETA, BETA, MAX_NORM = 0.05, 2.0, 2.0, 0.5, 0.1, 0.5


def _load(directory):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    model = AutoModel.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    return model, tokenizer


def _logits64(model, input_ids, attention, shifted):
    """Logits where position i scores token i, the model called as its family expects."""
    if shifted:  # Dream: a (batch, 1, seq, seq) boolean mask, or none when nothing is padded
        mask = None if bool(attention.all()) else attention.bool()[:, None, None, :].repeat(1, 1,
                                                                                             attention.shape[1], 1)
    else:
        mask = attention
    output = model(input_ids=input_ids, attention_mask=mask)
    logits = (output.logits if hasattr(output, "logits") else output[0]).double()
    if shifted:
        aligned = logits.clone()
        aligned[:, 1:] = logits[:, :-1]
        return aligned
    return logits


def _cart64(masked, attention, p=0.3):
    """Dream's CART weight of each masked position, by explicit sums over the row."""
    weights = torch.zeros(masked.shape, dtype=torch.float64)
    for row in range(masked.shape[0]):
        for i in range(masked.shape[1]):
            if not masked[row, i]:
                continue
            for j in range(masked.shape[1]):
                if j != i and attention[row, j] and not masked[row, j]:
                    weights[row, i] += 0.5 * p * (1 - p) ** (abs(i - j) - 1)
    return weights


def _inverse_inclusion64(batch):
    """1 / P(a response position is masked): t, plus the chance (1 - t)^L that
    no position is drawn times the 1/L chance that the forced one is this one."""
    weights = torch.zeros(batch.masked.shape, dtype=torch.float64)
    for row in range(batch.masked.shape[0]):
        t, length = float(batch.t[row]), int(batch.response_mask[row].sum())
        weights[row, :] = 1 / (t + (1 - t) ** length / length)
    return weights


def _mdlm64(logits, batch, cart):
    """Sum over masked response positions of CE x weight, over the response tokens."""
    log_probs = torch.log_softmax(logits, dim=-1)
    weights = _cart64(batch.masked, batch.attention_mask) if cart else _inverse_inclusion64(batch)
    total = logits.new_zeros(())
    for row, i in batch.masked.nonzero().tolist():
        total = total - log_probs[row, i, batch.targets[row, i]] * weights[row, i]
    return total / batch.response_mask.sum()


def _sequence_scores64(logits, batch, cart):
    """Per row: weighted log-likelihood of the masked positions over the answer length."""
    log_probs = torch.log_softmax(logits, dim=-1)
    weights = _cart64(batch.masked, batch.attention_mask) if cart else _inverse_inclusion64(batch)
    scores = []
    for row in range(logits.shape[0]):
        positions = batch.masked[row].nonzero()[:, 0].tolist()
        total = sum(log_probs[row, i, batch.targets[row, i]] * weights[row, i] for i in positions)
        scores.append(total / batch.response_mask[row].sum().double())
    return torch.stack(scores)


def _prompt_lengths(batch, examples):
    """Each row's prompt length, found by matching the row's clean tokens to an example."""
    lengths = []
    for row in batch.targets.tolist():
        match = [e for e in examples if row[:len(e.prompt_ids) + len(e.response_ids)] ==
                 list(e.prompt_ids + e.response_ids)]
        assert match, "a recorded row matches no example"
        lengths.append(len(match[0].prompt_ids))
    return lengths


def _divergence64(log_p, log_q, direction):
    """KL(p || q), KL(q || p) or Jensen-Shannon of two log-distributions, summed over the vocabulary."""
    p, q = log_p.exp(), log_q.exp()
    if direction == "forward":
        return (p * (log_p - log_q)).sum()
    if direction == "reverse":
        return (q * (log_q - log_p)).sum()
    m = (p + q) / 2
    return 0.5 * (p * (log_p - m.log())).sum() + 0.5 * (q * (log_q - m.log())).sum()


def _forget_loss64(method, model, anchor, batch, examples, mask_id, shifted, cart, kl="forward"):
    if method == "ga":
        return -_mdlm64(_logits64(model, batch.input_ids, batch.attention_mask, shifted), batch, cart)
    conditional = _logits64(model, batch.input_ids, batch.attention_mask, shifted)
    with torch.no_grad():
        if method == "mdu":
            anchor_ids = batch.input_ids.clone()
            for row, length in enumerate(_prompt_lengths(batch, examples)):
                anchor_ids[row, :length] = mask_id
        else:  # npo: the reference scores the very same noised input
            anchor_ids = batch.input_ids
        anchor_logits = _logits64(anchor, anchor_ids, batch.attention_mask, shifted)
    if method == "npo":
        ratio = _sequence_scores64(conditional, batch, cart) - _sequence_scores64(anchor_logits, batch, cart)
        return (2 / BETA * torch.log1p(torch.exp(BETA * ratio))).mean()
    total, count = conditional.new_zeros(()), 0
    for row, i in batch.masked.nonzero().tolist():
        lc, lu = conditional[row, i], anchor_logits[row, i]
        target = TAU * (lu - ETA * (lc.detach() - lu))
        log_p, log_q = torch.log_softmax(lc, -1), torch.log_softmax(target, -1)
        total = total + _divergence64(log_p, log_q, kl)
        count += 1
    return total / count


def _run_one_step(family, directory, method, tmp_path, monkeypatch, alpha=ALPHA, warmup=0.5, accounting="separate",
                  kl="forward", forget_records=FORGET_RECORDS, grad_accum=2, max_grad_norm=MAX_NORM, streamed=False,
                  **options):
    torch.manual_seed(0)
    model, tokenizer = _load(directory)
    start = copy.deepcopy(model)
    forwards = []  # the trainable model's, counted from after the anchor's copy
    forget = encode_dataset(load_dataset(write_jsonl(tmp_path / "f.jsonl", forget_records)), tokenizer, 64)
    retain = encode_dataset(load_dataset(write_jsonl(tmp_path / "r.jsonl", RETAIN_RECORDS)), tokenizer, 64)
    finetune = method == "finetune"  # one stream of records, no retain term
    shared = dict(model="m", lr=LR, max_steps=1, batch_size=2, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                  warmup_ratio=warmup, weight_decay=0.01, **options)
    if finetune:
        cfg = build_config({}, dict(data="f", **shared), FinetuneConfig)
    else:
        cfg = build_config({}, dict(forget="f", retain="r", method=method, tau=TAU, eta=ETA, npo_beta=BETA,
                                    alpha=alpha, batch_accounting=accounting, kl=kl, **shared))
    recorded, captured = [], {}
    real_noise = train_module.noise_response

    def record(*args, **kwargs):
        batch = real_noise(*args, **kwargs)
        recorded.append(batch)
        return batch

    monkeypatch.setattr(train_module, "noise_response", record)
    accelerator = Accelerator(cpu=True)
    real_clip = accelerator.clip_grad_norm_

    def capture_then_clip(parameters, max_norm):
        parameters = list(parameters)
        captured.update({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})
        return real_clip(parameters, max_norm)

    accelerator.clip_grad_norm_ = capture_then_clip
    anchor = copy.deepcopy(model).requires_grad_(False).eval() if method in ("mdu", "npo") else None
    if streamed and anchor is not None:  # --anchor-offload's anchor, the CPU standing in for the device
        from mdu_cli.model.streamed_anchor import StreamedAnchor

        anchor = StreamedAnchor(anchor, "cpu")
    fam = FAMILIES[family]
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    mask_id = model.config.mask_token_id if family == "dream" else tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    result = train_module.train(train_module.TrainingRun(
        model=model, anchor=anchor, forget=forget, retain=[] if finetune else retain, cfg=cfg, family=fam,
        mask_token_id=mask_id, pad_id=tokenizer.pad_token_id, accelerator=accelerator))
    return dict(model=model, start=start, forget=forget, recorded=recorded, grads=captured, history=result.history,
                forwards=len(forwards),
                # Decided by the family's name here, not read from the package's
                # Family: a Dream retain term trained with 1/t must fail.
                mask_id=mask_id, shifted=family == "dream", cart=family == "dream", kl=kl)


def _reference(run, method, alpha=ALPHA, warmup_factor=0.5):
    """Gradients before clipping, the norm, and the weights after one AdamW step, in float64."""
    model = copy.deepcopy(run["start"]).double().train()
    anchor = copy.deepcopy(run["start"]).double().eval().requires_grad_(False)
    batches = run["recorded"]
    total = None
    if method == "finetune":  # two micro-batches of training rows, nothing else
        for batch in batches:
            logits = _logits64(model, batch.input_ids, batch.attention_mask, run["shifted"])
            loss = _mdlm64(logits, batch, run["cart"]) / len(batches)
            total = loss if total is None else total + loss
    micro = len(batches) // 2 if method != "finetune" else 0
    for k in range(micro):  # forget, retain, forget, retain: the loop's order
        forget_batch, retain_batch = batches[2 * k], batches[2 * k + 1]
        loss = _forget_loss64(method, model, anchor, forget_batch, run["forget"], run["mask_id"], run["shifted"],
                              run["cart"], run["kl"])
        retain_logits = _logits64(model, retain_batch.input_ids, retain_batch.attention_mask, run["shifted"])
        loss = loss + alpha * _mdlm64(retain_logits, retain_batch, run["cart"])
        total = loss / micro if total is None else total + loss / micro
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    clip = min(1.0, MAX_NORM / (norm + 1e-6))
    lr = LR * warmup_factor
    after = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = grads[name] * clip
            # AdamW's first step: decoupled decay, then m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps).
            after[name] = p * (1 - lr * 0.01) - lr * g / (g.abs() + 1e-8)
    return grads, norm, after, lr


CASES = [("llada", "mdu"), ("llada", "ga"), ("llada", "npo"), ("llada", "finetune"),
         ("dream", "mdu"), ("dream", "ga"), ("dream", "npo"), ("dream", "finetune")]


def _assert_matches_reference(run, method):
    grads, norm, after, lr = _reference(run, method)
    assert set(run["grads"]) == set(grads)
    # float32 against float64: a relative 1e-3, and entries near zero (a key
    # bias's gradient is zero in exact arithmetic) judged against the largest
    # gradient of the model. A wiring bug is off by far more.
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, expected in grads.items():
        torch.testing.assert_close(run["grads"][name].double(), expected, rtol=1e-3, atol=1e-6 * scale,
                                   msg=lambda text, name=name: f"{name}: {text}")
    entry = run["history"][0]
    assert entry["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert entry["lr"] == pytest.approx(lr, rel=1e-12)
    for name, p in run["model"].named_parameters():
        # A float32 gradient a hair from zero can flip g / (|g| + eps) far more
        # than its own error: compare where the reference gradient is clear of eps.
        clear = grads[name].abs() * min(1.0, MAX_NORM / (norm + 1e-6)) > 1e-6
        torch.testing.assert_close(p.detach().double()[clear], after[name][clear], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family, method", CASES)
def test_one_step_matches_an_independent_float64_reference(family, method, family_dirs, tmp_path, monkeypatch):
    run = _run_one_step(family, family_dirs[family], method, tmp_path, monkeypatch)
    if method == "finetune":
        assert len(run["recorded"]) == 2, "two micro-batches of training rows"
    else:
        assert len(run["recorded"]) == 4, "two forget and two retain micro-batches"
    _assert_matches_reference(run, method)


@pytest.mark.parametrize("family, method, stack, streamed", [
    ("llada", "mdu", True, False), ("dream", "npo", True, False), ("llada", "mdu", False, True),
    ("dream", "mdu", True, True)])
def test_stacked_forward_and_streamed_anchor_match_the_float64_reference(family, method, stack, streamed,
                                                                          family_dirs, tmp_path, monkeypatch):
    """--stack-forward (one forward and one backward over a micro-batch's
    forget and retain rows) and --anchor-offload's streamed anchor (both
    micro-batches' anchor forwards in one pass) compute the same step as the
    reference; stacked, the trainable model runs once per micro-batch."""
    run = _run_one_step(family, family_dirs[family], method, tmp_path, monkeypatch, stack_forward=stack,
                        streamed=streamed)
    assert len(run["recorded"]) == 4, "two forget and two retain micro-batches, drawn in the loop's order"
    assert run["forwards"] == (2 if stack else 4)
    _assert_matches_reference(run, method)


@pytest.mark.parametrize("family, kl", [("llada", "reverse"), ("llada", "js"), ("dream", "reverse"),
                                        ("dream", "js")])
def test_every_kl_direction_matches_the_float64_reference(family, kl, family_dirs, tmp_path, monkeypatch):
    """--kl reverse and js reach the loss: KL(p_* || p_c) and Jensen-Shannon,
    written here from their definitions (a loop that kept the forward KL
    whatever --kl says is off by far more than the tolerance)."""
    run = _run_one_step(family, family_dirs[family], "mdu", tmp_path, monkeypatch, kl=kl)
    _assert_matches_reference(run, "mdu")


@pytest.mark.parametrize("forget_count, grad_accum, micro", [(3, 2, [2, 1]), (4, 3, [2, 2]), (1, 4, [1])])
def test_uneven_and_partial_steps_average_over_the_micro_batches_they_hold(forget_count, grad_accum, micro,
                                                                           family_dirs, tmp_path, monkeypatch):
    """A step's gradient is the mean over the micro-batches it actually holds:
    a last micro-batch of one row counts as one micro-batch (its loss is the
    mean of its own positions), and a step with fewer micro-batches than
    --grad-accum (an epoch's short last step, or a forget set smaller than a
    step) is divided by that count, not by --grad-accum."""
    run = _run_one_step("llada", family_dirs["llada"], "mdu", tmp_path, monkeypatch, grad_accum=grad_accum,
                        forget_records=FORGET_RECORDS[:forget_count])
    forget_batches = run["recorded"][0::2]
    assert [int(b.targets.shape[0]) for b in forget_batches] == micro
    _assert_matches_reference(run, "mdu")


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_non_finite_gradient_of_a_finite_loss_stops_the_run(in_backward, family_dirs, tmp_path, monkeypatch):
    """The loss is finite, one parameter's gradient is not: the ordinary step
    is refused before the optimizer applies it; in backward, where every
    parameter has already stepped, the run stops with nothing written (a NaN
    loss is only one way in)."""
    from mdu_cli.errors import MduError

    real_load, loaded = _load, []

    def load_with_a_poisoned_gradient(directory):
        model, tokenizer = real_load(directory)
        weight = dict(model.named_parameters())["model.transformer.blocks.0.q_proj.weight"]
        weight.register_hook(lambda grad: grad * math.inf)
        loaded.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model, tokenizer

    monkeypatch.setitem(globals(), "_load", load_with_a_poisoned_gradient)
    options = dict(grad_accum=1, max_grad_norm=0, optimizer_in_backward=True) if in_backward else {}
    message = ("the gradient is not finite at step 1 and was applied; nothing was written" if in_backward else
               "the gradient is not finite at step 1; nothing was written")
    with pytest.raises(MduError, match=message):
        _run_one_step("llada", family_dirs["llada"], "mdu", tmp_path, monkeypatch, **options)
    if not in_backward:
        model, before = loaded[0]
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "no weight was stepped"


def test_alpha_scales_the_retain_gradient_and_nothing_else(family_dirs, tmp_path, monkeypatch):
    """grad(alpha) = grad_forget + alpha * grad_retain with the same draws, so
    grad(2) - grad(1) = 2 * (grad(1) - grad(0.5)). (alpha = 0 skips the retain
    pass, and with it the retain draws: not comparable.)"""
    grads = {}
    for alpha in (0.5, 1.0, 2.0):
        with monkeypatch.context() as patch:
            run = _run_one_step("llada", family_dirs["llada"], "mdu", tmp_path, patch, alpha=alpha)
        grads[alpha] = run["grads"]
    scale = max(float(g.abs().max()) for g in grads[2.0].values())
    for name in grads[1.0]:
        torch.testing.assert_close(grads[2.0][name] - grads[1.0][name], 2 * (grads[1.0][name] - grads[0.5][name]),
                                   rtol=1e-3, atol=1e-6 * scale, msg=lambda text, name=name: f"{name}: {text}")
    assert any(float((grads[2.0][n] - grads[1.0][n]).abs().max()) > 1e-4 * scale for n in grads[1.0]), \
        "the retain term contributes a gradient"


@pytest.mark.parametrize("method", ["mdu", "npo", "ga"])
def test_what_each_forward_sees(method, family_dirs, tmp_path, monkeypatch):
    """The anchor sees the prompt masked (MDU) or the conditional input itself
    (NPO); the trainable model sees the prompt as it is, in the forget and in
    the retain pass; GA runs no anchor."""
    seen = []
    real = train_module.model_logits

    def spy(module, input_ids, attention_mask, family):
        seen.append((module, input_ids.clone()))
        return real(module, input_ids, attention_mask, family)

    monkeypatch.setattr(train_module, "model_logits", spy)
    run = _run_one_step("llada", family_dirs["llada"], method, tmp_path, monkeypatch)
    model = run["model"]
    forget_batch, retain_batch = run["recorded"][0], run["recorded"][1]
    calls = seen[:3] if method != "ga" else seen[:2]
    if method == "ga":
        assert [m is model for m, _ in calls] == [True, True]
        conditional, retained = calls
    else:
        assert [m is model for m, _ in calls] == [False, True, True]
        anchor_ids = calls[0][1]
        conditional, retained = calls[1], calls[2]
        lengths = _prompt_lengths(forget_batch, run["forget"])
        for row, length in enumerate(lengths):
            prompt = anchor_ids[row, :length]
            if method == "mdu":
                assert bool((prompt == run["mask_id"]).all()), "the MDU anchor sees every prompt position masked"
            else:
                assert torch.equal(anchor_ids[row], forget_batch.input_ids[row])
            assert torch.equal(anchor_ids[row, length:], forget_batch.input_ids[row, length:])
    assert torch.equal(conditional[1], forget_batch.input_ids)
    for row, clean in enumerate(retain_batch.targets):
        prompt = retain_batch.prompt_mask[row]
        assert torch.equal(retained[1][row][prompt], clean[prompt]), "the retain pass sees its prompt unmasked"
        assert not bool((retained[1][row][prompt] == run["mask_id"]).any())


def test_learning_rate_schedule_of_a_logged_run(llada_dir, forget_file, tmp_path):
    """Linear warmup over ceil(ratio x steps) steps from 1/(w+1) of --lr, then
    cosine decay that never reaches 0, read back from train_log.jsonl."""
    import json

    from click.testing import CliRunner

    from mdu_cli.cli import cli

    out, steps, ratio = tmp_path / "o", 10, 0.3
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--out",
                                      str(out), "--max-steps", str(steps), "--warmup-ratio", str(ratio), "--lr", "0.01",
                                      "--batch-size", "1", "--grad-accum", "1"])
    assert result.exit_code == 0, result.stderr
    logged = [json.loads(line)["lr"] for line in (out / "train_log.jsonl").open()]
    warmup = 3  # ceil(0.3 x 10)
    expected = [0.01 * (k + 1) / (warmup + 1) if k < warmup else
                0.01 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))) for k in range(steps)]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert min(logged) > 0


@pytest.mark.parametrize("family, method", [("llada", "mdu"), ("dream", "npo")])
def test_joint_accounting_step_matches_the_float64_reference(family, method, family_dirs, tmp_path, monkeypatch):
    """--batch-accounting joint: forget and retain rows shuffled into one set, so a
    micro-batch holds rows of either kind; its loss is the forget loss of its
    forget rows plus alpha times the retain loss of its retain rows, and the
    step's gradient the mean over the micro-batches."""
    run = _run_one_step(family, family_dirs[family], method, tmp_path, monkeypatch, accounting="joint")
    model = copy.deepcopy(run["start"]).double().train()
    anchor = copy.deepcopy(run["start"]).double().eval().requires_grad_(False)
    forget_tokens = {tuple(e.prompt_ids + e.response_ids) for e in run["forget"]}
    total, kinds = 0.0, []
    for batch in run["recorded"]:
        width = batch.attention_mask.sum(1).tolist()
        is_forget = all(tuple(row[:w]) in forget_tokens for row, w in zip(batch.targets.tolist(), width))
        kinds.append("forget" if is_forget else "retain")
        if is_forget:
            loss = _forget_loss64(method, model, anchor, batch, run["forget"], run["mask_id"], run["shifted"],
                                  run["cart"])
        else:
            logits = _logits64(model, batch.input_ids, batch.attention_mask, run["shifted"])
            loss = ALPHA * _mdlm64(logits, batch, run["cart"])
        total = total + loss / 2  # two micro-batches (grad_accum) in the step
    assert "forget" in kinds and "retain" in kinds, kinds
    rows = sum(int(b.targets.shape[0]) for b in run["recorded"])
    assert rows == 4, "two micro-batches of two rows, of either kind"
    assert run["history"][0]["forget_rows"] == sum(int(b.targets.shape[0]) for b, k in
                                                   zip(run["recorded"], kinds) if k == "forget")
    total.backward()
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(run["grads"][name].double(), p.grad, rtol=1e-3, atol=1e-6 * scale,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_joint_accounting_plans_passes_over_both_sets():
    from mdu_cli.train.loop import plan_steps

    cfg = build_config({}, dict(model="m", forget="f", retain="r", batch_size=2, grad_accum=2, epochs=2,
                                batch_accounting="joint"))
    plan = plan_steps(4, cfg, torch.Generator().manual_seed(0), n_retain=4)
    assert len(plan) == 4, "two passes over 8 rows in steps of 4: twice the separate accounting's steps"
    for epoch in (plan[:2], plan[2:]):
        assert sorted(i for step in epoch for micro in step for i in micro) == list(range(8))
    separate = plan_steps(4, build_config({}, dict(model="m", forget="f", retain="r", batch_size=2, grad_accum=2,
                                                    epochs=2)), torch.Generator().manual_seed(0), n_retain=4)
    assert len(separate) == 2 and all(i < 4 for step in separate for micro in step for i in micro)


def test_joint_accounting_without_a_retain_file_is_a_usage_error(llada_dir, forget_file, tmp_path):
    from click.testing import CliRunner
    from test_hostile_inputs import snapshot

    from mdu_cli.cli import cli

    before = snapshot(forget_file)
    result = CliRunner().invoke(cli, ["unlearn", "--model", str(llada_dir), "--forget", str(forget_file), "--out",
                                      str(tmp_path / "out"), "--batch-accounting", "joint"])
    assert result.exit_code == 2 and "--batch-accounting joint mixes forget and retain rows" in result.stderr
    assert snapshot(forget_file) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("n, batch_size", [(5, 2), (3, 4), (4, 4), (7, 3)])
def test_the_retain_stream_is_successive_shuffled_passes(n, batch_size):
    """Separate accounting draws retain rows from an endless stream: read in
    order, it is one shuffled pass over the n rows after another (each row once
    a pass), cut into micro-batches of --batch-size, or of n when the retain set
    is smaller than a batch (then each micro-batch is a whole pass, no row twice)."""
    from mdu_cli.train.loop import cycle_batches

    stream = cycle_batches(n, batch_size, torch.Generator().manual_seed(0))
    batches = [next(stream) for _ in range(12)]
    size = min(batch_size, n)
    assert all(len(b) == size for b in batches)
    if size == n:
        assert all(sorted(b) == list(range(n)) for b in batches)
    flat = [i for b in batches for i in b]
    passes = [flat[k:k + n] for k in range(0, len(flat) - n + 1, n)]
    assert all(sorted(p) == list(range(n)) for p in passes), passes
    assert len({tuple(p) for p in passes}) > 1, "each pass is shuffled anew"
