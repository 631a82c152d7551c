"""Torch-free: the typed configs of each command, their YAML reading, and the choice lists."""
