"""`mdu corpus`: the forget corpus of an RWKU target, written by the model itself.

RWKU gives no forget corpus: the model to be unlearned writes one, by RWKU's
recipe (its generation/pair_generation.py): the target's intro and "You know
<target> very well." as the system turn, "Please write a short biography of
<target>." as the user turn, sampled at temperature 1.0 with top-p 0.9, up to
512 new tokens. (RWKU also starts each answer with one of a list of opening
phrases for variety; here the variety is the sampling's alone.) Each sample
becomes one {"prompt", "completion"} record, the prompt being the user turn,
ready for `mdu unlearn --forget`. Beside it, FILE.meta.json records the
model, its revision, the RWKU files' commit and every setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from mdu_cli.errors import ConfigError, MduError
from mdu_cli.evaluation.benchmarks.rwku.data import DEFAULT_SOURCE

META_SUFFIX = ".meta.json"
WRITTEN_BY = "mdu corpus"


def user_turn(target: str) -> str:
    return f"Please write a short biography of {target}."


def system_turn(intro: str, target: str) -> str:
    return f"{intro} You know {target} very well."


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + META_SUFFIX)


def check_out(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """The corpus and its record may only replace a corpus this command wrote
    (with --overwrite), never an input nor another file."""
    from mdu_cli.io.output_location import is_within, unwritable

    for path in (out, meta_path(out)):
        for source in inputs:
            if Path(source).exists() and is_within(path, source):
                raise MduError(f"--out {out} is inside {source}, which this command reads; write the corpus "
                               "elsewhere")
        if path.is_dir():
            raise MduError(f"--out {out}: {path} is a directory; give a file name")
    if out.exists() or out.is_symlink() or meta_path(out).exists():
        ours = _written_by_us(meta_path(out))
        if not ours:
            raise MduError(f"--out {out} exists and is not a corpus mdu wrote (no {meta_path(out).name} of "
                           f"{WRITTEN_BY!r} beside it); choose another file name, or remove it yourself")
        if not overwrite:
            raise MduError(f"--out {out} exists (a corpus mdu wrote); pass --overwrite to replace it")
    problem = unwritable(out.parent)
    if problem:
        raise MduError(f"--out {out}: {problem}; choose another path")


def _written_by_us(meta: Path) -> bool:
    if meta.is_symlink() or not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def write_corpus(model: str, target: str, out: str | Path, rwku: str = DEFAULT_SOURCE, samples: int = 16,
                 max_new_tokens: int = 512, steps: Optional[int] = None, block_length: int = 32,
                 temperature: float = 1.0, top_p: float = 0.9, seed: int = 0, batch_size: int = 8,
                 revision: Optional[str] = None, device: str = "auto", trust_remote_code: bool = False,
                 overwrite: bool = False, show_progress: bool = True) -> dict:
    """Sample `samples` biographies of `target` from MODEL; returns the record
    written beside them. Everything is checked before the weights load."""
    import torch
    from tqdm.auto import tqdm

    from mdu_cli import __version__
    from mdu_cli.config.generation import PRESETS
    from mdu_cli.evaluation.benchmarks.rwku.data import read_intro
    from mdu_cli.io.atomic import write_text_atomic
    from mdu_cli.model.inference import prepare_inference
    from mdu_cli.model.sampling import generate

    if temperature <= 0:
        raise ConfigError("--temperature must be > 0: a corpus of greedy samples is one biography repeated")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (got {top_p})")
    steps = steps or max_new_tokens
    out = Path(out)
    check_out(out, overwrite, [Path(model)] + ([Path(rwku)] if not rwku.startswith("hf://") else []))
    intro, rwku_record, _ = read_intro(rwku, target)

    loaded = prepare_inference(model, revision, trust_remote_code=trust_remote_code, device=device)
    messages = [{"role": "system", "content": system_turn(intro, target)},
                {"role": "user", "content": user_turn(target)}]
    prompt = loaded.prompt_ids(messages, where="the corpus prompt")
    loaded.check_length(len(prompt) + max_new_tokens, f"--target {target!r}",
                        f"the biography prompt with --max-new-tokens {max_new_tokens}")
    loaded.load_weights()

    generator = torch.Generator().manual_seed(seed)
    records, empty = [], 0
    with tqdm(total=samples, desc="corpus", unit="sample", disable=not show_progress, dynamic_ncols=True) as bar:
        for first in range(0, samples, batch_size):
            rows = min(batch_size, samples - first)
            outputs = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompt] * rows,
                               max_new_tokens=max_new_tokens, steps=steps, block_length=block_length,
                               temperature=temperature, top_p=top_p, pad_id=loaded.pad_id,
                               stop_ids=loaded.stop_ids(), generator=generator,
                               ordering=PRESETS["paper"][loaded.family.name]["ordering"])
            for ids in outputs:
                text = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
                if text:
                    records.append({"prompt": user_turn(target), "completion": text})
                else:
                    empty += 1
            bar.update(rows)
    if not records:
        raise MduError(f"{model}: every one of the {samples} samples was empty; the model ends its answer at once "
                       "(check its chat template)")
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    meta = {
        "written_by": WRITTEN_BY, "mdu_version": __version__, "target": target,
        "model": {"id": loaded.source.name, "is_hub": loaded.source.is_hub, "revision": loaded.source.revision},
        "rwku": rwku_record,
        "settings": {"samples": samples, "max_new_tokens": max_new_tokens, "steps": steps,
                     "block_length": block_length, "temperature": temperature, "top_p": top_p, "seed": seed,
                     "batch_size": batch_size, "device": str(loaded.device),
                     "system": system_turn("<intro>", target), "user": user_turn(target)},
        "records": len(records), "empty_samples": empty, "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
    }
    # Old corpus out, the record, then the corpus: an interrupted run leaves
    # no corpus beside a record that is not its own.
    out.unlink(missing_ok=True)
    write_text_atomic(meta_path(out), json.dumps(meta, indent=2) + "\n")
    write_text_atomic(out, body)
    return meta
