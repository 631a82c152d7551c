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
from transformers import PreTrainedTokenizerBase

from mdu_cli import __version__
from mdu_cli.config.hub_names import is_hub_data
from mdu_cli.config.trackers import parse_trackers
from mdu_cli.config.training import TrainingConfig
from mdu_cli.data.records import Dataset, load_dataset
from mdu_cli.data.tokenization import Example, encode_dataset, pad_token_id
from mdu_cli.diff.format import format_markdown, write_json
from mdu_cli.diff.report import compare, compare_adapter, is_adapter_dir, top_layers
from mdu_cli.errors import ConfigError, MduError
from mdu_cli.hub.card import CARD_NAME, read_license, render_card
from mdu_cli.io.atomic import write_text_atomic
from mdu_cli.io.output_location import (
    DELTA_JSON,
    DELTA_MARKDOWN,
    RUN_RECORD,
    TRAIN_LOG,
    OutputLock,
    check_free_space,
    check_out_dir,
    is_within,
    new_staging_dir,
    publish,
    remove_leftovers,
    remove_state,
    unwritable,
)
from mdu_cli.io.output_writer import write_adapter, write_model
from mdu_cli.io.safetensors_reader import open_directory
from mdu_cli.model.checkpointing import enable_gradient_checkpointing
from mdu_cli.model.families import Family, choose_family, resolve_mask_token_id
from mdu_cli.model.loading import (
    ModelSource,
    decide_remote_code,
    fetch_weights,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_device,
    resolve_source,
)
from mdu_cli.model.lora import AdapterOffAnchor, apply_lora, check_targets
from mdu_cli.train import optimizers
from mdu_cli.train.loop import TrainingRun, TrainResult, is_sharded, train
from mdu_cli.train.monitor import Probe, tracker_config
from mdu_cli.train.resume import fingerprint, load_state, state_dir_for, weights_identity

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
            "tensors_changed": self.record["delta"]["tensors_changed"],
            "tensors_compared": self.record["delta"]["tensors_compared"],
        }


def is_main_process_env() -> bool:
    """Rank 0 by the launcher's environment (before accelerate is set up)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def default_out_dir(cfg: TrainingConfig) -> Path:
    name = Path(cfg.model.rstrip("/")).name or "model"
    return Path(f"{name}-{cfg.described.settings(cfg.to_dict())}")


def choose_device_and_dtype(cfg: TrainingConfig) -> tuple[str, str, torch.dtype, str]:
    """(device, dtype name, weight dtype, accelerate mixed precision).

    bf16 keeps the weights themselves in bf16, which is what makes full MDU on
    an 8B model fit (docs/method.md section 3). fp16 weights do not train stably, so
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


def host_anchor(model, source, trust: bool, weight_dtype, device):
    """The anchor theta_0 in host memory: a second instance built on the CPU and
    given the starting weights tensor by tensor (so the device never holds a
    second copy, even for a moment), its blocks streamed to `device` for
    each pass (model/streamed_anchor.py)."""
    return offload_copy(load_model(source, trust, weight_dtype), model, device)


def offload_copy(shell, model, device):
    """`shell` (a host-memory instance of the model's class) given the model's
    current weights tensor by tensor, frozen, as a `StreamedAnchor`: the
    blocks stay in (pinned) host memory and are streamed to `device`."""
    from mdu_cli.model.streamed_anchor import StreamedAnchor

    with torch.no_grad():
        target = shell.state_dict()
        for name, tensor in model.state_dict().items():
            target[name].copy_(tensor)  # one tensor in flight: never a whole second copy on the host
    return StreamedAnchor(shell, device)


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
    write_json(report, staging / DELTA_JSON)
    write_text_atomic(staging / DELTA_MARKDOWN, format_markdown(report))
    return report


def _inputs(cfg: TrainingConfig, out: Path) -> list[Path]:
    """Every path the run reads that the user owns: what no output may replace."""
    # A Hub data file (hf://datasets/...) is read from the Hugging Face cache,
    # never from a path an output could take.
    paths = [Path(p) for p in (cfg.records, cfg.retain_records, cfg.config_file, cfg.chat_template)
             if p and not is_hub_data(p)]
    model = Path(cfg.model).expanduser()
    if model.exists():
        paths.append(model)
    if cfg.resume:
        paths.append(state_dir_for(out))
    return paths


_BYTES_PER_DTYPE = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}


def expected_output_bytes(source, cfg: TrainingConfig, weight_dtype: torch.dtype) -> int:
    """About how many bytes the run writes (the weights, and with --save-every
    the resumable state: weights and two AdamW moments), from the base's files.
    0 when the size is not known before download (a single-file Hub model)."""
    files = [p for p in source.path.glob("*.safetensors") if p.is_file()]
    if files:
        base = sum(p.stat().st_size for p in files)
    else:
        try:
            index = json.loads((source.path / "model.safetensors.index.json").read_text(encoding="utf-8"))
            base = int(index["metadata"]["total_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
    stored = _BYTES_PER_DTYPE.get(str(source.config.get("torch_dtype") or source.config.get("dtype")), 0)
    written = base * weight_dtype.itemsize // stored if stored else base
    if cfg.lora:
        # An adapter, or merged weights; the state holds only the adapter.
        return 0 if cfg.save_adapter else written
    return written + (3 * written if cfg.save_every else 0)


@dataclass
class PreparedRun:
    """Everything `mdu unlearn` settles before any weights load: every check
    that can fail cheaply has passed once this exists."""

    cfg: TrainingConfig
    out: Path
    inputs: list[Path]           # what no output may replace
    source: ModelSource
    family: Family
    trust: bool                  # the remote-code decision
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int
    forget_data: Dataset         # the objective's records (the training records of `mdu finetune`)
    retain_data: Optional[Dataset]
    forget: list[Example]
    retain: list[Example]
    device: str
    dtype_name: str
    weight_dtype: torch.dtype
    mixed_precision: str
    state_dir: Path
    state_key: str
    trackers: list
    logging_dir: Optional[Path]
    optimizer: str  # the resolved --optimizer


def prepare_run(cfg: TrainingConfig) -> PreparedRun:
    """The checks, in the order that fails cheapest first: the output location
    against the inputs, the data files, the checkpoint's small files (family,
    remote-code policy, tokenizer, mask token), the tokenised lengths against
    --max-length and the model's positions, the device."""
    # Absolute from here on: "--out ." must name a directory, not "", for the
    # siblings (staging, lock, state) that sit beside it.
    out = Path(os.path.abspath(Path(cfg.out).expanduser() if cfg.out else default_out_dir(cfg)))
    cfg = dataclasses.replace(cfg, out=str(out))  # record where it went, default or not
    inputs = _inputs(cfg, out)
    # Before anything else: no input may be, or lie inside, what the run replaces.
    local_model = Path(cfg.model).expanduser()
    check_out_dir(out, cfg.overwrite, base_dir=local_model if local_model.is_dir() else None, protected=inputs)
    forget_data = load_dataset(cfg.records)
    retain_data = load_dataset(cfg.retain_records) if cfg.retain_records else None
    # A Hub data file is read from the Hugging Face cache: that copy is an input too.
    inputs += [data.path for data in (forget_data, retain_data) if data is not None and data.hub]

    source = resolve_source(cfg.model, cfg.revision)
    check_out_dir(out, cfg.overwrite, base_dir=source.path, protected=inputs)
    family = choose_family(source.config, source.name, cfg.family)
    trust = decide_remote_code(source, cfg.trust_remote_code)
    tokenizer = load_tokenizer(source, trust, cfg.chat_template)
    mask_token_id = resolve_mask_token_id(family, source.config, tokenizer, source.name)
    positions = max_positions(source.config)
    forget = encode_dataset(forget_data, tokenizer, cfg.max_length, positions)
    retain = encode_dataset(retain_data, tokenizer, cfg.max_length, positions) if retain_data else []
    device, dtype_name, weight_dtype, mixed_precision = choose_device_and_dtype(cfg)
    optimizer = optimizers.resolve(cfg.optimizer, weight_dtype, cfg.optimizer_in_backward)
    optimizers.check_available(optimizer)
    if cfg.optimizer_in_backward and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under DDP a parameter's gradient is complete only once the ranks
        # have averaged it, after its hook would already have stepped.
        raise ConfigError("--optimizer-in-backward runs in one process; for several GPUs drop it "
                          "(FSDP shards the gradients instead)")
    if cfg.joint_accounting:
        _check_joint_plan(cfg, len(forget), len(retain))
    if cfg.compile_blocks:
        from mdu_cli.model.compilation import check_compile

        check_compile(device)
    trackers = parse_trackers(cfg.report_to)
    logging_dir = _logging_dir(cfg, out, [*inputs, source.path]) if trackers else None
    # Every run: a Ctrl-C saves a state even without --save-every. A few MB read.
    state_key = fingerprint(cfg.to_dict(), {"forget": forget_data.sha256,
                                            "retain": retain_data.sha256 if retain_data else None,
                                            "base": weights_identity(source)})
    return PreparedRun(cfg=cfg, out=out, inputs=inputs, source=source, family=family, trust=trust, tokenizer=tokenizer,
                       mask_token_id=mask_token_id, forget_data=forget_data, retain_data=retain_data, forget=forget,
                       retain=retain, device=device, dtype_name=dtype_name, weight_dtype=weight_dtype,
                       mixed_precision=mixed_precision, state_dir=state_dir_for(out), state_key=state_key,
                       trackers=trackers, logging_dir=logging_dir, optimizer=optimizer)


def _check_joint_plan(cfg: TrainingConfig, n_forget: int, n_retain: int) -> None:
    """The plan is fixed by the seed: a joint run whose steps draw no forget
    row at all would publish an "unlearned" model that never saw one."""
    from mdu_cli.train.loop import plan_steps

    plan = plan_steps(n_forget, cfg, torch.Generator().manual_seed(cfg.seed),
                      int(os.environ.get("WORLD_SIZE", "1")), n_retain=n_retain)
    if not any(i < n_forget for step in plan for micro in step for i in micro):
        raise MduError(f"--batch-accounting joint draws no forget row in the {len(plan)} steps of this run "
                       f"({n_forget} forget and {n_retain} retain rows, seed {cfg.seed}); raise "
                       "--max-steps or --epochs, or use --batch-accounting separate")


def _logging_dir(cfg: TrainingConfig, out: Path, protected: list[Path]) -> Path:
    """Where the trackers write: --logging-dir, or OUT-logs beside the output."""
    logging_dir = Path(os.path.abspath(Path(cfg.logging_dir).expanduser() if cfg.logging_dir
                                       else out.parent / f"{out.name}-logs"))
    # The output is replaced as a whole when it is published: logs inside it
    # would vanish. Nor may they go into an input (the base model's folder
    # included) or hold one.
    if is_within(logging_dir, out) or any(is_within(logging_dir, p) or is_within(p, logging_dir) for p in protected):
        raise ConfigError(f"--logging-dir {logging_dir} lies inside --out or holds an input; "
                          "put the tracker logs elsewhere")
    if logging_dir.exists() and not logging_dir.is_dir():
        raise ConfigError(f"--logging-dir {logging_dir} is a file; name a directory")
    problem = unwritable(logging_dir)
    if problem:
        raise ConfigError(f"--logging-dir {logging_dir}: {problem}; name a directory the tracker can write")
    return logging_dir


def run_unlearn(cfg: TrainingConfig, show_progress: bool = True, keep_model: bool = False) -> UnlearnResult:
    started = time.perf_counter()
    run = prepare_run(cfg)
    cfg, out, state_dir = run.cfg, run.out, run.state_dir
    # Only the main process writes: it holds the lock on the output for the
    # whole run, clears what killed runs left, and checks the room there.
    is_main_env = is_main_process_env()
    lock = OutputLock(out).acquire() if is_main_env else None
    staging = None
    try:
        if is_main_env:
            remove_leftovers(out, protected=run.inputs)
        resume_from = None
        if cfg.resume:
            resume_from = load_state(state_dir, run.state_key)
            if resume_from is None:
                log.info("Notice: no saved state in %s; starting from the beginning", state_dir)
        elif (state_dir / "progress.json").is_file() and not cfg.overwrite:
            raise MduError(f"{state_dir} holds the state of an interrupted run; pass --resume to continue it, "
                           "or --overwrite to start over")
        if is_main_env:
            staging = new_staging_dir(out)
            check_free_space(out.parent, expected_output_bytes(run.source, cfg, run.weight_dtype), "the output")
        return _train_and_write(run, resume_from, staging, started, show_progress, keep_model)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_and_write(run: PreparedRun, resume_from, staging: Optional[Path], started: float, show_progress: bool,
                     keep_model: bool) -> UnlearnResult:
    """The expensive half of a run, in four phases: load the weights (and the
    anchor), train, gather the trained weights, and on the main process write
    the output into `staging` and publish it."""
    cfg, out = run.cfg, run.out
    fetch_weights(run.source)
    if cfg.lora:
        check_targets(cfg.lora_targets, open_directory(run.source.path, run.source.name).tensors)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=run.device == "cpu", mixed_precision=run.mixed_precision,
                              log_with=run.trackers or None, project_dir=run.logging_dir)
    if run.trackers:
        public = {run.source.name} if run.source.is_hub else set()
        accelerator.init_trackers(f"mdu-{cfg.command}", config=tracker_config(cfg.to_dict(), public))
    if accelerator.num_processes > 1 and not accelerator.is_main_process:
        log.setLevel(logging.WARNING)  # one copy of every notice, from the main process
    try:
        model, anchor = _load_for_training(run, accelerator)
        probe = None
        if cfg.eval_every:
            probe = Probe(run.forget_data.records, run.retain_data.records if run.retain_data else [],
                          cfg.eval_records, run.tokenizer, run.family, run.mask_token_id, cfg.seed)
        result: TrainResult = train(TrainingRun(
            model=model, anchor=anchor, forget=run.forget, retain=run.retain, cfg=cfg, family=run.family,
            mask_token_id=run.mask_token_id, pad_id=pad_token_id(run.tokenizer), accelerator=accelerator,
            log_path=staging / TRAIN_LOG if accelerator.is_main_process else None,
            show_progress=show_progress and accelerator.is_main_process, state_dir=run.state_dir,
            state_key=run.state_key, resume_from=resume_from, probe=probe, optimizer_name=run.optimizer,
        ))
        model, full_state = _gather_trained(model, run, accelerator)
        if not accelerator.is_main_process:
            return UnlearnResult(out_dir=out, record=None)
        if not keep_model:
            del anchor  # before writing: the writer may need the memory
            anchor = None
        model, record = _write_output(model, full_state, run, result, staging, started, show_progress)
        check_out_dir(out, cfg.overwrite, base_dir=run.source.path, protected=run.inputs)
        publish(staging, out)
        remove_state(run.state_dir)  # the output is complete: nothing left to resume
    finally:
        # Close the process group before this rank leaves: the other ranks
        # return while the main process is still writing, and an interpreter
        # that exits with gloo's threads alive can abort ("terminate called
        # without an active exception", 1 launch in 25 here).
        accelerator.end_training()
    return UnlearnResult(out_dir=out, record=record, model=model if keep_model else None, anchor=anchor)


def _load_for_training(run: PreparedRun, accelerator):
    """The trainable model on its device, and the anchor the method reads:
    a frozen copy (on the device, in host memory with --anchor-offload, or
    sharded under FSDP), the model itself with the adapter off (LoRA), or
    None (methods without one)."""
    cfg, source, trust, weight_dtype = run.cfg, run.source, run.trust, run.weight_dtype
    needs_anchor = cfg.objective().needs_anchor
    offload = needs_anchor and cfg.anchor_offload  # only an unlearning run has an anchor to offload
    sharded = is_sharded(accelerator)
    if sharded and offload:  # before any weight loads
        raise ConfigError("--anchor-offload does not combine with FSDP, which already shards the anchor")
    if run.device == "cuda":
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
        if sharded:
            anchor = sharded_anchor(source, trust, weight_dtype, accelerator)
        elif offload:
            anchor = host_anchor(model, source, trust, weight_dtype, accelerator.device)
        else:
            anchor = frozen_copy(model)
    else:
        anchor = None
    if cfg.gradient_checkpointing:
        # After the anchor copy: the frozen model only runs without gradients.
        enable_gradient_checkpointing(model)
    if cfg.compile_blocks:
        from mdu_cli.model.compilation import compile_blocks

        compile_blocks(model)
    if not cfg.described.unlearns:
        log.info("Fine-tuning %s on %d records [%s, mask id %d] on %s in %s", source.name, len(run.forget),
                 run.family.name, run.mask_token_id, run.device, run.dtype_name)
    else:
        log.info("Unlearning %d records (%d retain) from %s [%s, mask id %d] on %s in %s", len(run.forget),
                 len(run.retain), source.name, run.family.name, run.mask_token_id, run.device, run.dtype_name)
    return model, anchor


def _gather_trained(model, run: PreparedRun, accelerator):
    """The trained model as one process can write it, and under FSDP the
    gathered full weights (None otherwise). Collective: every rank calls it."""
    cfg = run.cfg
    sharded = is_sharded(accelerator)
    accelerator.wait_for_everyone()
    # Under FSDP each rank holds a shard: gathering the full weights takes
    # every rank, so it happens before the non-main ranks leave.
    full_state = accelerator.get_state_dict(model) if sharded else None
    if not accelerator.is_main_process:
        return None, None
    model = accelerator.unwrap_model(model)
    if sharded and cfg.lora:
        # peft merges and saves tensor by tensor, which sharded weights
        # cannot do on one rank: rebuild the adapted model unsharded on the
        # host from the gathered weights.
        model = apply_lora(load_model(run.source, run.trust, run.weight_dtype), cfg.lora_r, cfg.lora_alpha,
                           cfg.lora_dropout, cfg.lora_targets)
        model.load_state_dict(full_state)
        full_state = None
    model.eval()
    return model, full_state


def _write_output(model, full_state, run: PreparedRun, result: TrainResult, staging: Path, started: float,
                  show_progress: bool):
    """Weights (or the adapter), the delta report, mdu_run.json and the card,
    into `staging`. Refuses an output in which no weight moved. Returns the
    model as written (a LoRA model merged) and the record."""
    cfg, source = run.cfg, run.source
    if cfg.save_adapter:
        write_adapter(model, source, staging)
    else:
        if cfg.lora:
            model = model.merge_and_unload()  # full weights, loadable exactly like the base
        write_model(model, source.path, staging, cfg.shard_size_bytes, state_dict=full_state)
    if cfg.chat_template:
        # The template the run trained with goes with the weights (transformers
        # reads chat_template.jinja before tokenizer_config.json), so `mdu eval`,
        # `mdu generate` and anyone loading the output format prompts the same way.
        (staging / "chat_template.jinja").write_text(run.tokenizer.chat_template, encoding="utf-8")
        (staging / "chat_template.json").unlink(missing_ok=True)
    delta = write_delta_report(source, staging, run.out, show_progress)
    changed = sum(1 for tensor in delta["tensors"] if tensor["frac_changed"] > 0)
    if changed == 0:
        # An unchanged model written as "unlearned" would be worse than no
        # output: someone could publish it believing the data forgotten.
        raise MduError(f"no weight changed in {result.steps} steps (the updates rounded away, or every gradient "
                       "was zero); nothing was written. Raise --lr or --max-steps, or train in --dtype fp32")
    record = _run_record(run, result, delta, changed, started)
    (staging / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (staging / CARD_NAME).write_text(render_card(staging, title=run.out.name), encoding="utf-8")
    return model, record


def _run_record(run: PreparedRun, result: TrainResult, delta: dict, changed: int, started: float) -> dict:
    """mdu_run.json: what produced the output, enough to reproduce it."""
    cfg, source = run.cfg, run.source
    return {
        "tool": "mdu",
        "version": __version__,
        "command": cfg.command,
        "method": cfg.described.name,
        "config": cfg.to_dict(),
        "base_model": {"id": source.name, "is_hub": source.is_hub, "revision": source.revision,
                       "license": read_license(source.path)},
        "family": run.family.name,
        "mask_token_id": run.mask_token_id,
        "data": {"forget": run.forget_data.summary(),
                 "retain": run.retain_data.summary() if run.retain_data else None},
        "truncated_responses": {"forget": sum(e.truncated for e in run.forget),
                                "retain": sum(e.truncated for e in run.retain)},
        "seed": cfg.seed,
        "optimizer": result.optimizer,
        "device": run.device,
        "dtype": run.dtype_name,
        "steps": result.steps,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "peak_memory_bytes": _peak_memory_bytes(run.device),
        "losses": {"forget": result.first_last("forget_loss"), "retain": result.first_last("retain_loss")},
        "delta": {"rel_l2": delta["total"]["rel_l2"], "tensors_changed": changed,
                  "tensors_compared": len(delta["tensors"]),
                  "top_layers": [{"layer": x["layer"], "rel_l2": x["rel_l2"]} for x in top_layers(delta)]},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
