"""The FSDP2-sharded anchor holds the base weights on every rank, although
only rank 0 read them. Run by tests/fsdp_launch.py (`--check-anchor`) under
`accelerate launch --use_fsdp` with two CPU processes, before the unlearning
run it launches, so that one launch serves both. FSDP2 is forced on the CPU as
in tests/fsdp_launch.py, once the plain loads are done.
"""

import torch
from accelerate import Accelerator

from mdu_cli.model.loading import load_model, resolve_source
from mdu_cli.train.run import sharded_anchor


def check_anchor(model_dir: str, reference_logits: str, force_fsdp2) -> None:
    accelerator = Accelerator(cpu=True)
    source = resolve_source(model_dir)
    plain = load_model(source, True, torch.float32)
    # Under the FSDP environment transformers reads real weights on rank 0 only.
    rank0_only = accelerator.process_index != 0 and not all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                          load_model(source, True, torch.float32).state_dict().values()))
    force_fsdp2()
    assert accelerator.is_fsdp2
    anchor = sharded_anchor(source, True, torch.float32, accelerator)
    assert not any(p.requires_grad for p in anchor.parameters())
    assert any(type(p).__name__ == "DTensor" for p in anchor.parameters()), "the anchor is sharded"
    ids = torch.tensor([[1, 7, 8, 9, 10, 11, 12, 5, 5, 5]])
    with torch.no_grad():
        logits = anchor(input_ids=ids).logits
    want = torch.load(reference_logits)
    print(f"rank {accelerator.process_index}: rank0_only={rank0_only} "
          f"max_diff={(logits - want).abs().max().item()}", flush=True)
