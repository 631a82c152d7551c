"""The streamed anchor of --anchor-offload (mdu_cli/model/streamed_anchor.py):
one pass over its blocks serves every forget micro-batch of a step, moves one
anchor's worth of bytes, and gives each forward the in-memory anchor's logits
bit for bit."""

import pytest
import torch
from conftest import write_jsonl

from mdu_cli.config.training import build_config
from mdu_cli.model.families import FAMILIES, model_logits
from mdu_cli.model.loading import load_model, resolve_source
from mdu_cli.train.run import frozen_copy, host_anchor, run_unlearn


def _anchors(directory):
    source = resolve_source(str(directory))
    model = load_model(source, True, torch.float32)
    return frozen_copy(model), host_anchor(model, source, True, torch.float32, "cpu")


def _batches(vocab: int):
    """Three batches of different widths, one with a padded row."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for rows, width in ((2, 9), (3, 14), (1, 5)):
        ids = torch.randint(1, vocab - 2, (rows, width), generator=gen)
        mask = torch.ones_like(ids)
        if rows > 1:
            mask[-1, width - 3:] = 0
        batches.append((ids, mask))
    return batches


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_one_pass_gives_every_forward_the_in_memory_anchors_logits(family, family_dirs):
    in_memory, streamed = _anchors(family_dirs[family])
    fam = FAMILIES[family]
    batches = _batches(in_memory.config.vocab_size)
    with torch.no_grad():
        want = [model_logits(in_memory, ids, mask, fam) for ids, mask in batches]
        got = streamed.forward_many([lambda m, ids=ids, mask=mask: model_logits(m, ids, mask, fam)
                                     for ids, mask in batches])
    assert all(torch.equal(a, b) for a, b in zip(want, got)), "bit for bit, each forward as if alone"
    assert streamed.bytes_copied == streamed.pass_bytes() > 0, "one pass: each block copied once for all three"
    with torch.no_grad():
        again = [model_logits(streamed, ids, mask, fam) for ids, mask in batches]
    assert all(torch.equal(a, b) for a, b in zip(want, again))
    assert streamed.bytes_copied == 4 * streamed.pass_bytes(), "alone, a forward is a pass of its own"


def test_a_failing_forward_stops_the_pass_and_leaves_the_anchor_usable(llada_dir):
    in_memory, streamed = _anchors(llada_dir)
    fam = FAMILIES["llada"]
    (ids, mask), *_ = _batches(in_memory.config.vocab_size)

    def broken(module):
        raise ValueError("this forward fails")

    with torch.no_grad(), pytest.raises(ValueError, match="this forward fails"):
        streamed.forward_many([lambda m: model_logits(m, ids, mask, fam), broken,
                               lambda m: model_logits(m, ids, mask, fam)])
    stored = {t.data_ptr() for block in streamed._host for _, t in block}
    assert all(p.data_ptr() in stored for block in streamed.units for p in block.parameters()), "all released"
    with torch.no_grad():
        assert torch.equal(model_logits(streamed, ids, mask, fam), model_logits(in_memory, ids, mask, fam))
    with pytest.raises(RuntimeError, match="runs through StreamedAnchor"):
        streamed.module(input_ids=ids)  # the bare module has its blocks on the host: refused, not garbage


@pytest.mark.parametrize("grad_accum, ahead", [(1, False), (3, False), (3, True)])
def test_a_step_moves_one_anchors_worth_whatever_grad_accum(grad_accum, ahead, dream_dir, tmp_path, monkeypatch):
    """Each optimizer step's forget micro-batches share one streamed pass: the
    bytes copied are (steps x one anchor's blocks) for --grad-accum 1 and 3,
    and the weights equal the in-memory anchor's run bit for bit; so too when
    the pass runs a step ahead, in the background, as it does on CUDA."""
    if ahead:
        from test_optimizers import run_ahead

        run_ahead(monkeypatch)
    forget = write_jsonl(tmp_path / "forget.jsonl", [
        {"prompt": f"Who wrote book {i}?", "completion": f"Book {i} was written by author number {i * 7}."}
        for i in range(6)])
    results = {}
    for name, offload in (("copy", False), ("host", True)):
        cfg = build_config({}, dict(model=str(dream_dir), forget=str(forget), out=str(tmp_path / name), max_steps=2,
                                    batch_size=1, grad_accum=grad_accum, lr=1e-3, warmup_ratio=0.0, device="cpu",
                                    anchor_offload=offload))
        results[name] = run_unlearn(cfg, show_progress=False, keep_model=True)
    anchor = results["host"].anchor
    assert anchor.ahead is ahead
    assert anchor.bytes_copied == 2 * anchor.pass_bytes()
    copy, host = results["copy"].model.state_dict(), results["host"].model.state_dict()
    assert all(torch.equal(copy[k], host[k]) for k in copy)
    assert not all(torch.equal(copy[k], results["copy"].anchor.state_dict()[k]) for k in copy), "training moved it"
