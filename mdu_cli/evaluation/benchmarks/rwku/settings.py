"""How long each part of RWKU generates, by RWKU's definitions or the MDU
paper's (`--preset paper`), and how explicit options override them. No torch.

RWKU: probes and TriviaQA 30 new tokens, BBH and fluency 256. The paper: 64
tokens in 64 steps for the probes, MMLU (by generated letter) and TriviaQA;
BBH and fluency as RWKU. One token per step throughout; the block length and
ordering are the family's paper preset (LLaDA: blocks of 128, confidence;
Dream: one block, entropy), capped by the length.
"""

from __future__ import annotations

from mdu_cli.config.generation import PRESETS

RWKU_TOKENS = {"forget": 30, "neighbor": 30, "general": 0, "reasoning": 256, "factuality": 30, "fluency": 256}
PAPER_TOKENS = {**RWKU_TOKENS, "forget": 64, "neighbor": 64, "general": 64, "factuality": 64}
EXPLICIT = ("max_new_tokens", "steps", "block_length", "ordering")


def resolve(requested: dict, family: str) -> dict:
    """What the report records: the preset (or None), the family's block
    length and ordering, the options given explicitly, and each part's length."""
    family_preset = PRESETS["paper"][family]
    generation = {"preset": requested.get("preset"), "block_length": family_preset["block_length"],
                  "ordering": family_preset["ordering"],
                  "explicit": {k: requested[k] for k in EXPLICIT if requested.get(k) is not None}}
    # RWKU's MMLU generates nothing (one masked position); the paper's generates its letter.
    parts = [p for p in RWKU_TOKENS if p != "general" or generation["preset"] == "paper"]
    generation["max_new_tokens"] = {p: part_settings(generation, p)["max_new_tokens"] for p in parts}
    return generation


def part_settings(generation: dict, part: str) -> dict:
    """The sampler's keyword arguments for one part."""
    explicit = generation.get("explicit", {})
    tokens = explicit.get("max_new_tokens") or (PAPER_TOKENS if generation.get("preset") == "paper"
                                                else RWKU_TOKENS)[part]
    return {"max_new_tokens": tokens, "steps": explicit.get("steps", tokens),
            "block_length": explicit.get("block_length", min(generation["block_length"], tokens)),
            "ordering": explicit.get("ordering", generation["ordering"])}
