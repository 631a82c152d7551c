"""The model families, loading a checkpoint, LoRA, inference, sampling, activation checkpointing."""
