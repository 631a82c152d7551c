"""`mdu unlearn` as a library call: validate, load, train, write.

Every check that can fail cheaply runs before the model is loaded (and before
a Hub model's weights are downloaded): the data files, the output directory,
the remote-code policy, the family and mask token, and the tokenised lengths.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mdu_cli import __version__
from mdu_cli.checkpoint import check_out_dir, new_staging_dir, publish, write_adapter, write_model
from mdu_cli.checkpointing import enable_gradient_checkpointing
from mdu_cli.config import UnlearnConfig
from mdu_cli.data import load_dataset
from mdu_cli.delta_report import compare, compare_adapter, is_adapter_dir, top_layers
from mdu_cli.errors import MduError
from mdu_cli.families import FAMILIES, check_not_autoregressive, detect_family, resolve_mask_token_id
from mdu_cli.methods import make_method
from mdu_cli.model_card import CARD_NAME, read_license, render_card
from mdu_cli.lora import AdapterOffAnchor, apply_lora
from mdu_cli.loading import (decide_remote_code, fetch_weights, load_model, load_tokenizer, resolve_device,
                             resolve_source)
from mdu_cli.resume import fingerprint, load_state, state_dir_for
from mdu_cli.report_format import format_markdown, write_json, write_text_atomic
from mdu_cli.safetensors_reader import open_directory
from mdu_cli.tokenization import encode_dataset, pad_token_id
from mdu_cli.train import TrainResult, train

log = logging.getLogger("mdu")


@dataclass
class UnlearnResult:
    out_dir: Path
    record: Optional[dict[str, Any]]  # what mdu_run.json holds; None in non-main processes
    model: Any = None           # with keep_model: the trained model, in memory
    anchor: Any = None          # with keep_model: the frozen starting model it was pulled toward

    def summary(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "steps": self.record["steps"],
            "forget_loss": self.record["losses"]["forget"],
            "retain_loss": self.record["losses"]["retain"],
            "wall_time_s": self.record["wall_time_s"],
            "delta_rel_l2": self.record["delta"]["rel_l2"],
            "top_layers": self.record["delta"]["top_layers"],
        }


def is_main_process_env() -> bool:
    """Rank 0 by the launcher's environment (before accelerate is set up)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def default_out_dir(cfg: UnlearnConfig) -> Path:
    name = Path(cfg.model.rstrip("/")).name or "model"
    return Path(f"{name}-mdu-tau{cfg.tau:g}")


def choose_device_and_dtype(cfg: UnlearnConfig) -> tuple[str, str, torch.dtype, str]:
    """(device, dtype name, weight dtype, accelerate mixed precision).

    bf16 keeps the weights themselves in bf16, which is what makes full MDU on
    an 8B model fit (METHOD.md section 3). fp16 weights do not train stably, so
    fp16 means fp32 weights under fp16 autocast with loss scaling (CUDA only).
    """
    device = resolve_device(cfg.device)
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp16" and device != "cuda":
        raise MduError("--dtype fp16 needs a CUDA device; use --dtype fp32 (or bf16) on the CPU")
    weights = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[dtype]
    return device, dtype, weights, ("fp16" if dtype == "fp16" else "no")


def _peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def frozen_copy(model):
    """The anchor theta_0: a frozen copy of the starting weights."""
    anchor = copy.deepcopy(model)
    anchor.requires_grad_(False)
    return anchor.eval()


def broadcast_from_main(module, accelerator) -> None:
    """Make every rank's weights rank 0's. DDP does this for the trainable
    model when it wraps it, but the frozen anchor is copied before that, and a
    rank's own load may differ from rank 0's: under accelerate's FSDP settings
    transformers reads real weights on rank 0 only, and weights missing from
    the checkpoint are initialised at random on each rank."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor, src=0)


def sharded_anchor(source, trust: bool, weight_dtype, accelerator):
    """The anchor under FSDP: the starting weights loaded again and sharded like
    the trainable model. A copy of the model would not do: with accelerate's
    RAM-efficient loading only rank 0 holds real weights until FSDP wraps the
    model and broadcasts them, so a copy taken before that is garbage on the
    other ranks, and one taken after is a shard without FSDP's gathers. Wrapping
    this second load broadcasts rank 0's weights in the same way."""
    anchor = load_model(source, trust, weight_dtype)
    anchor.requires_grad_(False)
    if accelerator.is_fsdp2:
        # accelerate's prepare() insists on an optimizer for FSDP2; the frozen
        # anchor has none, so its model half is called directly.
        from accelerate.utils import fsdp2_prepare_model

        anchor = fsdp2_prepare_model(accelerator, anchor)
    else:
        anchor = accelerator.prepare_model(anchor)
    return anchor.eval()


def write_delta_report(source, staging: Path, out: Path, show_progress: bool) -> dict:
    """delta_report.json and delta_report.md of the new weights against the base,
    by the engine behind `mdu diff`."""
    base = open_directory(source.path, source.name)
    base.revision = source.revision
    if is_adapter_dir(staging):
        report = compare_adapter(base, staging, str(out), show_progress=show_progress)
    else:
        report = compare(base, open_directory(staging, str(out)), show_progress=show_progress)
    report["other"]["path"] = str(out)  # where the files will be once the output is published
    write_json(report, staging / "delta_report.json")
    write_text_atomic(staging / "delta_report.md", format_markdown(report))
    return report


def run_unlearn(cfg: UnlearnConfig, show_progress: bool = True, keep_model: bool = False) -> UnlearnResult:
    started = time.perf_counter()
    forget_data = load_dataset(cfg.forget)
    retain_data = load_dataset(cfg.retain) if cfg.retain else None
    out = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    cfg = dataclasses.replace(cfg, out=str(out))  # record where it went, default or not
    data_paths = [forget_data.path] + ([retain_data.path] if retain_data else [])
    check_out_dir(out, cfg.overwrite, protected=data_paths)

    source = resolve_source(cfg.model, cfg.revision)
    check_out_dir(out, cfg.overwrite, base_dir=source.path, protected=data_paths)
    if cfg.family:
        check_not_autoregressive(source.config, source.name)
        family = FAMILIES[cfg.family]
    else:
        family = detect_family(source.config, source.name)
    trust = decide_remote_code(source, cfg.trust_remote_code)
    tokenizer = load_tokenizer(source, trust, cfg.chat_template)
    mask_token_id = resolve_mask_token_id(family, source.config, tokenizer, source.name)
    forget = encode_dataset(forget_data, tokenizer, cfg.max_length)
    retain = encode_dataset(retain_data, tokenizer, cfg.max_length) if retain_data else []
    device, dtype_name, weight_dtype, mixed_precision = choose_device_and_dtype(cfg)

    state_dir = state_dir_for(out)
    state_key = fingerprint(cfg.to_dict(), {"forget": forget_data.sha256,
                                            "retain": retain_data.sha256 if retain_data else None})
    resume_from = None
    if cfg.resume:
        resume_from = load_state(state_dir, state_key)
        if resume_from is None:
            log.info("Notice: no saved state in %s; starting from the beginning", state_dir)
        if is_main_process_env():
            for stale in out.parent.glob(f".{out.name}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by the run that was killed
    elif (state_dir / "progress.json").is_file() and not cfg.overwrite:
        raise MduError(f"{state_dir} holds the state of an interrupted run; pass --resume to continue it, "
                       "or --overwrite to start over")

    fetch_weights(source)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)
    is_main = accelerator.is_main_process
    if accelerator.num_processes > 1 and not is_main:
        log.setLevel(logging.WARNING)  # one copy of every notice, from the main process
    needs_anchor = make_method(cfg).needs_anchor
    sharded = accelerator.distributed_type.name == "FSDP"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load_model(source, trust, weight_dtype)
    if not sharded:
        # Move before copying, so the anchor is made on the device and the host
        # never holds two copies of an 8B model. Under FSDP the wrap places
        # each rank's shard; moving the whole model first would defeat it.
        model = model.to(accelerator.device)
        broadcast_from_main(model, accelerator)
    torch.manual_seed(cfg.seed)  # the adapter's random initialisation is part of the run
    if cfg.lora:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        anchor = AdapterOffAnchor(model) if needs_anchor else None
    elif needs_anchor:
        anchor = sharded_anchor(source, trust, weight_dtype, accelerator) if sharded else frozen_copy(model)
    else:
        anchor = None
    if cfg.gradient_checkpointing:
        # After the anchor copy: the frozen model only runs without gradients.
        enable_gradient_checkpointing(model)
    log.info(
        "Unlearning %d records (%d retain) from %s [%s, mask id %d] on %s in %s",
        len(forget), len(retain), source.name, family.name, mask_token_id, device, dtype_name,
    )

    # Only the main process writes: the output, the log, the saved state.
    staging = new_staging_dir(out) if is_main else None
    try:
        result: TrainResult = train(
            model, anchor, forget, retain, cfg, family, mask_token_id, pad_token_id(tokenizer),
            accelerator, log_path=staging / "train_log.jsonl" if is_main else None,
            show_progress=show_progress and is_main,
            state_dir=state_dir, state_key=state_key,
            resume_from=resume_from,
        )
        accelerator.wait_for_everyone()
        # Under FSDP each rank holds a shard: gathering the full weights takes
        # every rank, so it happens before the non-main ranks leave.
        full_state = accelerator.get_state_dict(model) if sharded else None
        if not is_main:
            return UnlearnResult(out_dir=out, record=None)
        if not keep_model:
            del anchor  # before writing: the writer may need the memory
            anchor = None
        model = accelerator.unwrap_model(model)
        if sharded and cfg.lora:
            # peft merges and saves tensor by tensor, which sharded weights
            # cannot do on one rank: rebuild the adapted model unsharded on the
            # host from the gathered weights.
            model = apply_lora(load_model(source, trust, weight_dtype), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                               cfg.lora_targets)
            model.load_state_dict(full_state)
            full_state = None
        model.eval()
        if cfg.save_adapter:
            write_adapter(model, source, staging)
        else:
            if cfg.lora:
                model = model.merge_and_unload()  # full weights, loadable exactly like the base
            write_model(model, source.path, staging, cfg.max_shard_size, state_dict=full_state)
        delta = write_delta_report(source, staging, out, show_progress)
        record = {
            "tool": "mdu",
            "version": __version__,
            "command": "unlearn",
            "method": cfg.method,
            "config": cfg.to_dict(),
            "base_model": {"id": source.name, "is_hub": source.is_hub, "revision": source.revision,
                           "license": read_license(source.path)},
            "family": family.name,
            "mask_token_id": mask_token_id,
            "data": {"forget": forget_data.summary(), "retain": retain_data.summary() if retain_data else None},
            "truncated_responses": {"forget": sum(e.truncated for e in forget),
                                    "retain": sum(e.truncated for e in retain)},
            "seed": cfg.seed,
            "device": device,
            "dtype": dtype_name,
            "steps": result.steps,
            "wall_time_s": round(time.perf_counter() - started, 3),
            "peak_memory_bytes": _peak_memory_bytes(device),
            "losses": {"forget": result.first_last("forget_loss"), "retain": result.first_last("retain_loss")},
            "delta": {"rel_l2": delta["total"]["rel_l2"],
                      "top_layers": [{"layer": x["layer"], "rel_l2": x["rel_l2"]} for x in top_layers(delta)]},
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
            },
        }
        (staging / "mdu_run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (staging / CARD_NAME).write_text(render_card(staging, title=out.name), encoding="utf-8")
        check_out_dir(out, cfg.overwrite, base_dir=source.path, protected=data_paths)
        publish(staging, out)
        shutil.rmtree(state_dir, ignore_errors=True)  # the output is complete: nothing left to resume
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        # Close the process group before this rank leaves: the other ranks
        # return while the main process is still writing, and an interpreter
        # that exits with gloo's threads alive can abort ("terminate called
        # without an active exception", 1 launch in 25 here).
        accelerator.end_training()
    return UnlearnResult(out_dir=out, record=record, model=model if keep_model else None, anchor=anchor)
