"""How the transformer blocks of a checkpoint are named (torch-free): the
attribute of the list of blocks, as the families and common architectures
name it. Activation checkpointing and LoRA find the blocks by it, and the
delta report groups tensors into layers by it."""

BLOCK_LIST_NAMES = ("blocks", "layers", "layer", "h")
# The same names as a regular-expression alternation.
BLOCK_LIST_PATTERN = "|".join(BLOCK_LIST_NAMES)
