"""Cost of one MDU step against one plain MDLM fine-tuning step, side by side.

On a LLaDA-shaped model of about 20M parameters (the tests' remote-code
fixture, scaled up), batch 4 x 256 tokens, CPU:

- MDU step: anchor forward (no grad) + conditional forward/backward on the
  forget batch, MDLM forward/backward on the retain batch, AdamW step.
- Plain step: MDLM forward/backward on the same forget batch and on the same
  retain batch, AdamW step.

Time: both kinds of step alternate in one process, so machine noise hits
both alike; the median of each is reported. Memory: each kind runs in a fresh
child process, whose peak RSS (VmHWM) is read from /proc (Linux). MDU adds one no-grad
forward of the forget batch, so the floor is about 7/6 = 1.17 in time.

    python benchmarks/step_cost.py [--steps 10] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def write_config(directory: Path, layers: int, d_model: int, vocab: int, heads: int = 8):
    """The config and remote code of a LLaDA-shaped model of the requested
    size (no weights); returns the loaded config."""
    import json as _json
    import shutil

    from tiny_models import FIXTURES
    from transformers import AutoConfig

    directory.mkdir(parents=True, exist_ok=True)
    for code in (FIXTURES / "tiny_llada").glob("*.py"):
        shutil.copy(code, directory / code.name)
    (directory / "config.json").write_text(_json.dumps({
        "model_type": "tiny_llada", "architectures": ["TinyLLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_tiny_llada.TinyLLaDAConfig",
                     "AutoModel": "modeling_tiny_llada.TinyLLaDAModelLM"},
        "vocab_size": vocab, "d_model": d_model, "n_layers": layers, "n_heads": heads,
        "mlp_hidden_size": 3 * d_model, "mask_token_id": vocab - 1,
    }))
    return AutoConfig.from_pretrained(directory, trust_remote_code=True)


def build_model(directory: Path, layers: int, d_model: int, vocab: int) -> None:
    """A LLaDA-shaped remote-code checkpoint of the requested size."""
    from transformers import AutoModel

    config = write_config(directory, layers, d_model, vocab)
    torch.manual_seed(0)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(directory)


def add_shape_arguments(parser, layers: int, d_model: int, vocab: int, batch: int, seq: int, prompt: int) -> None:
    """The model and batch shape options every benchmark here takes, with its own defaults."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--d-model", type=int, default=d_model)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--prompt", type=int, default=prompt)


def mdu_loss(model, anchor, batch, mask_id: int, family, noise: torch.Generator) -> torch.Tensor:
    """The MDU forget loss (tau 1) of one batch, with its graph, as the
    training loop computes it: only the masked positions of the anchor's
    no-grad logits are kept."""
    from mdu_cli.methods.masking import anchor_input_ids, noise_response
    from mdu_cli.methods.objectives import mdu_forget_loss
    from mdu_cli.model.families import model_logits

    noised = noise_response(batch, mask_id, noise)
    with torch.no_grad():
        anchor_view = model_logits(anchor, anchor_input_ids(noised, mask_id), noised.attention_mask,
                                   family)[noised.masked]
    logits = model_logits(model, noised.input_ids, noised.attention_mask, family)
    return mdu_forget_loss(logits, anchor_view, noised.masked, tau=1.0)


def mdlm_batch_loss(model, batch, mask_id: int, family, noise: torch.Generator) -> torch.Tensor:
    """The MDLM (retain / fine-tuning) loss of one batch, with its graph."""
    from mdu_cli.methods.masking import noise_response
    from mdu_cli.methods.objectives import mdlm_loss
    from mdu_cli.model.families import model_logits

    noised = noise_response(batch, mask_id, noise)
    logits = model_logits(model, noised.input_ids, noised.attention_mask, family)
    return mdlm_loss(logits, noised)


def make_batches(vocab: int, batch: int, seq: int, prompt: int):
    from mdu_cli.data.tokenization import Example, collate

    gen = torch.Generator().manual_seed(0)

    def examples():
        return [Example(tuple(torch.randint(0, vocab - 1, (prompt,), generator=gen).tolist()),
                        tuple(torch.randint(0, vocab - 1, (seq - prompt,), generator=gen).tolist()))
                for _ in range(batch)]

    return collate(examples(), 0), collate(examples(), 0)


class Stepper:
    """One optimizer step of either kind, built from mdu's own pieces."""

    def __init__(self, model_dir: Path, batch: int, seq: int, prompt: int, with_anchor: bool = True):
        from mdu_cli.model.families import FAMILIES
        from mdu_cli.model.loading import load_model, resolve_source
        from mdu_cli.train.run import frozen_copy

        torch.manual_seed(0)
        source = resolve_source(str(model_dir))
        self.model = load_model(source, True, torch.float32).train()
        # Plain fine-tuning has no anchor; MDU's frozen copy is part of its cost.
        self.anchor = frozen_copy(self.model) if with_anchor else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.family = FAMILIES["llada"]
        self.mask_id = source.config["mask_token_id"]
        self.forget, self.retain = make_batches(source.config["vocab_size"], batch, seq, prompt)
        self.noise = torch.Generator().manual_seed(1)
        self.params = sum(p.numel() for p in self.model.parameters())

    def _mdlm(self, batch):
        mdlm_batch_loss(self.model, batch, self.mask_id, self.family, self.noise).backward()

    def mdu_step(self):
        mdu_loss(self.model, self.anchor, self.forget, self.mask_id, self.family, self.noise).backward()
        self._mdlm(self.retain)
        self._finish()

    def anchor_forward(self):
        """Just MDU's extra work: the no-grad anchor forward of the forget batch."""
        from mdu_cli.methods.masking import anchor_input_ids, noise_response
        from mdu_cli.model.families import model_logits

        noised = noise_response(self.forget, self.mask_id, self.noise)
        with torch.no_grad():
            model_logits(self.anchor, anchor_input_ids(noised, self.mask_id), noised.attention_mask, self.family)

    def plain_step(self):
        self._mdlm(self.forget)
        self._mdlm(self.retain)
        self._finish()

    def _finish(self):
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _proc_status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB. Unlike ru_maxrss, which Linux carries
    over from the parent through fork and exec, VmHWM belongs to this process's
    own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_child(kind: str, model_dir: str, args: dict, queue) -> None:
    import transformers  # noqa: F401  (libraries count toward the baseline, not the step)

    import mdu_cli.train.loop  # noqa: F401

    baseline = _proc_status_mb("VmRSS")
    stepper = Stepper(Path(model_dir), args["batch"], args["seq"], args["prompt"], with_anchor=kind == "mdu")
    step = stepper.mdu_step if kind == "mdu" else stepper.plain_step
    for _ in range(3):
        step()
    peak = _proc_status_mb("VmHWM")
    queue.put({"peak_rss_mb": peak, "above_baseline_mb": peak - baseline})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    add_shape_arguments(parser, layers=8, d_model=384, vocab=8192, batch=4, seq=256, prompt=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llada-20m"
        build_model(model_dir, args.layers, args.d_model, args.vocab)
        shape = {"batch": args.batch, "seq": args.seq, "prompt": args.prompt}

        stepper = Stepper(model_dir, **shape)
        stepper.mdu_step()
        stepper.plain_step()  # warm-up of both paths
        kinds = {"mdu": stepper.mdu_step, "plain": stepper.plain_step, "anchor_forward": stepper.anchor_forward}
        times = {kind: [] for kind in kinds}
        for round_ in range(args.steps):
            # Alternate the order each round, so that neither kind always runs
            # right after the other's allocations.
            order = list(kinds) if round_ % 2 == 0 else list(reversed(kinds))
            for kind in order:
                start = time.perf_counter()
                kinds[kind]()
                times[kind].append(time.perf_counter() - start)
        params = stepper.params
        del stepper

        ctx = mp.get_context("spawn")
        memory = {}
        for kind in ("mdu", "plain"):
            queue = ctx.Queue()
            child = ctx.Process(target=_peak_rss_child, args=(kind, str(model_dir), shape, queue))
            child.start()
            memory[kind] = queue.get()
            child.join()

    median = {kind: statistics.median(values) for kind, values in times.items()}
    report = {
        "params_millions": round(params / 1e6, 2),
        "batch": f"{args.batch} x {args.seq} tokens ({args.prompt} prompt)",
        "torch_threads": torch.get_num_threads(),
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "time_ratio_mdu_over_plain": round(median["mdu"] / median["plain"], 3),
        # What MDU cannot avoid on this machine: a plain step plus one no-grad forward.
        "floor_ratio_measured": round((median["plain"] + median["anchor_forward"]) / median["plain"], 3),
        "peak_rss_mb": {k: round(v["peak_rss_mb"], 1) for k, v in memory.items()},
        "training_memory_mb": {k: round(v["above_baseline_mb"], 1) for k, v in memory.items()},
        "memory_ratio_mdu_over_plain": round(memory["mdu"]["peak_rss_mb"] / memory["plain"]["peak_rss_mb"], 3),
        "training_memory_ratio": round(memory["mdu"]["above_baseline_mb"] / memory["plain"]["above_baseline_mb"], 3),
        "target_time_ratio": 1.25,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"LLaDA-shaped model: {report['params_millions']}M parameters, batch {report['batch']}, "
          f"{report['torch_threads']} threads, {args.steps} timed steps of each kind")
    print(f"  median step   MDU {median['mdu']:.3f}s   plain MDLM {median['plain']:.3f}s   "
          f"ratio {report['time_ratio_mdu_over_plain']:.3f} (target <= 1.25)")
    print(f"  floor         one no-grad forward {median['anchor_forward']:.3f}s, so (plain + forward) / plain = "
          f"{report['floor_ratio_measured']:.3f} on this machine")
    print(f"  peak RSS      MDU {report['peak_rss_mb']['mdu']:.0f} MB   "
          f"plain MDLM {report['peak_rss_mb']['plain']:.0f} MB   "
          f"ratio {report['memory_ratio_mdu_over_plain']:.3f}")
    print(f"  above the process baseline (libraries)   MDU {report['training_memory_mb']['mdu']:.0f} MB   "
          f"plain MDLM {report['training_memory_mb']['plain']:.0f} MB   ratio {report['training_memory_ratio']:.3f} "
          "(MDU holds a frozen anchor copy)")


if __name__ == "__main__":
    main()
