"""Generation settings: the defaults, the orderings and the presets of the
sampler, and how options and a preset combine. No torch here, so that the
commands can show them in --help without importing it."""

from __future__ import annotations

DEFAULT_GENERATION = {"max_new_tokens": 128, "steps": 128, "block_length": 32, "ordering": "confidence"}

# The settings of the paper's evaluation, per family: LLaDA with blocks of 128
# tokens and one token per step; Dream as its diffusion_generate does it, one
# block, the lowest-entropy positions first. Any option given explicitly wins.
PRESETS = {
    "paper": {
        "llada": {"max_new_tokens": 256, "steps": 256, "block_length": 128, "ordering": "confidence"},
        "dream": {"max_new_tokens": 256, "steps": 256, "block_length": 256, "ordering": "entropy"},
        "masked-lm": {"max_new_tokens": 256, "steps": 256, "block_length": 128, "ordering": "confidence"},
    },
}


def requested(preset, **given) -> dict:
    """The settings a command asks for: explicit options over the preset (which
    is resolved per family once the model is known), or over the defaults."""
    typed = {k: v for k, v in given.items() if v is not None}
    if preset:
        return {"preset": preset, **typed}
    return {**DEFAULT_GENERATION, **typed}


def resolve_generation(options: dict, family: str) -> dict:
    """The generation settings to use: a preset's values for the family, under
    the options given explicitly; the result names the preset it came from."""
    preset = options.get("preset")
    if not preset:
        return {"ordering": "confidence", **{k: v for k, v in options.items() if k != "preset"}}
    settings = dict(PRESETS[preset][family])
    settings.update({k: v for k, v in options.items() if k != "preset" and v is not None})
    return {**settings, "preset": preset}


def generation_kwargs(settings: dict) -> dict:
    """The keyword arguments of `generate` in a settings dict (the preset name is a record, not an option)."""
    return {k: v for k, v in settings.items() if k != "preset"}
