"""--gradient-checkpointing: same gradients, activations recomputed, every family."""

import json

import pytest
import torch

from mdu_cli.config.training import build_config
from mdu_cli.model.checkpointing import enable_gradient_checkpointing, transformer_blocks
from mdu_cli.model.families import FAMILIES, model_logits
from mdu_cli.model.loading import load_model, resolve_source
from mdu_cli.train.run import run_unlearn

# Assertions on floating-point results: rerun under every CPU kernel level (tests/cpu_kernels.py).
pytestmark = pytest.mark.numerics


def _gradients_and_block_calls(directory, family, checkpointed):
    source = resolve_source(str(directory))
    model = load_model(source, True, torch.float32).train()
    first_linear = next(m for m in transformer_blocks(model)[0].modules() if isinstance(m, torch.nn.Linear))
    calls = []
    first_linear.register_forward_hook(lambda *args: calls.append(1))
    if checkpointed:
        enable_gradient_checkpointing(model)
    ids = torch.randint(5, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    model_logits(model, ids, mask, FAMILIES[family]).float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("family", ["llada", "dream", "masked-lm"])
def test_same_gradients_with_recomputation(family, family_dirs):
    plain, plain_calls = _gradients_and_block_calls(family_dirs[family], family, False)
    saved, saved_calls = _gradients_and_block_calls(family_dirs[family], family, True)
    assert plain.keys() == saved.keys()
    for name in plain:
        assert torch.allclose(plain[name], saved[name], atol=1e-6, rtol=1e-5), name
    assert plain_calls == 1 and saved_calls == 2, "the block's layers ran again in backward"


def test_unlearn_with_gradient_checkpointing_matches_without(llada_dir, forget_file, tmp_path):
    states = []
    for flag in (False, True):
        cfg = build_config({}, dict(model=str(llada_dir), forget=str(forget_file), out=str(tmp_path / str(flag)),
                                    max_steps=2, batch_size=2, lr=1e-3, gradient_checkpointing=flag))
        result = run_unlearn(cfg, show_progress=False, keep_model=True)
        states.append(result.model.state_dict())
        assert json.loads((result.out_dir / "mdu_run.json").read_text())["config"]["gradient_checkpointing"] == flag
    for name in states[0]:
        assert torch.allclose(states[0][name], states[1][name], atol=1e-6), name
