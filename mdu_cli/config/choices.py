"""Every choice list of the command line, once (torch-free, so `--help` is
fast): the Click options, the config's validation and the library read them
from here."""

from mdu_cli.methods import METHODS

FAMILIES = ("llada", "dream", "masked-lm")
# The unlearning methods: the registry's names (mdu_cli/methods/__init__.py).
UNLEARN_METHODS = tuple(METHODS)
KL_DIRECTIONS = ("forward", "reverse", "js")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bf16", "fp16", "fp32")
# How forget and retain rows make up a step: "separate" (each micro-batch holds
# --batch-size forget rows and as many retain rows; an epoch is a pass over the
# forget set) or "joint" (the paper's reference code: both sets shuffled into
# one, micro-batches of --batch-size rows of either kind; an epoch is a pass
# over both).
BATCH_ACCOUNTINGS = ("separate", "joint")
# --optimizer: see mdu_cli/train/optimizers.py.
OPTIMIZERS = ("auto", "adamw", "adamw-kahan", "adamw-sr", "adamw-8bit")
# Generation: which predictions are committed first (mdu_cli/model/sampling.py).
ORDERINGS = ("confidence", "entropy")
TRACKERS = ("tensorboard", "wandb", "trackio")
