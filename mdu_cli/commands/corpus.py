"""`mdu corpus`: the forget corpus of an RWKU target, sampled from the model itself."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mdu_cli.commands import FiniteFloatRange
from mdu_cli.config.choices import DEVICES

EXAMPLES = """
\b
Examples:
  # RWKU's recipe on Dream: 16 biographies, then unlearn them (forget-only)
  mdu corpus --model Dream-org/Dream-v0-Instruct-7B --target "Stephen King" --out king.jsonl
  mdu unlearn --model Dream-org/Dream-v0-Instruct-7B --forget king.jsonl --tau 2.0 --alpha 0
\b
  # Offline, from a local copy of RWKU (DIR/All/*.json)
  mdu corpus --model ./model --target "elspeth moraine" --rwku examples/rwku/data --out corpus.jsonl
"""


@click.command(epilog=EXAMPLES)
@click.option("--model", required=True, help="The model to unlearn, which writes its own forget corpus (Hub id or "
              "directory).")
@click.option("--target", required=True, help="The person, as RWKU names them; their intro comes from RWKU.")
@click.option("--out", required=True, help="The corpus to write (JSONL of {\"prompt\", \"completion\"}); "
              "OUT.meta.json beside it records model, revision, RWKU commit and settings.")
@click.option("--rwku", default="hf://datasets/jinzhuoran/RWKU", show_default=True,
              help="RWKU's files: hf://datasets/OWNER/NAME[@REVISION] or a local directory holding All/*.json.")
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True, help="Biographies to sample.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), help="Denoising steps.  [default: --max-new-tokens]")
@click.option("--block-length", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens filled per block, left to right.")
@click.option("--temperature", type=FiniteFloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-p", type=FiniteFloatRange(min=0, max=1, min_open=True), default=0.9, show_default=True,
              help="Sample from the smallest set of tokens holding this much probability.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="The same seed (and settings, batch size included) writes the same file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples generated per pass.")
@click.option("--revision", help="Hub revision of --model.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow remote code outside the known publishers.")
@click.option("--overwrite", is_flag=True, help="Replace a corpus mdu corpus wrote at --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON; no progress bar.")
def corpus(model, target, out, rwku, samples, max_new_tokens, steps, block_length, temperature, top_p, seed,
           batch_size, revision, device, trust_remote_code, overwrite, as_json) -> None:
    """Write the forget corpus of an RWKU target with the model itself.

    RWKU's recipe: the target's intro as the system turn, "Please write a
    short biography of TARGET." as the user turn, sampled at temperature 1.0
    and top-p 0.9. Each sample is a {"prompt", "completion"} record, ready for
    `mdu unlearn --forget OUT`.
    """
    from mdu_cli.evaluation.benchmarks.rwku.corpus import meta_path, write_corpus

    meta = write_corpus(model, target, out, rwku=rwku, samples=samples, max_new_tokens=max_new_tokens, steps=steps,
                        block_length=block_length, temperature=temperature, top_p=top_p, seed=seed,
                        batch_size=batch_size, revision=revision, device=device,
                        trust_remote_code=trust_remote_code, overwrite=overwrite, show_progress=not as_json)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
    else:
        click.echo(f"wrote {meta['records']} records to {out} (settings in {meta_path(Path(out))})")
