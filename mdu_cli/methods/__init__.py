"""The unlearning methods. `METHODS` is the registry: one module per method
(its loss, its options, how a card and an output name describe it), one line
here. Torch-free to import; see `base.py`."""

from mdu_cli.methods import finetune, ga, mdu, npo
from mdu_cli.methods.base import Method

METHODS: dict[str, Method] = {method.name: method for method in (mdu.METHOD, ga.METHOD, npo.METHOD)}


def method_of(name: str) -> Method:
    """The entry a run's `method` names: one of METHODS, or fine-tuning's."""
    if name == finetune.METHOD.name:
        return finetune.METHOD
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}")
    return METHODS[name]


def method_of_record(record: dict) -> Method:
    """The entry an `mdu_run.json` names (records without a method are MDU runs)."""
    return method_of(record.get("method", "mdu"))
