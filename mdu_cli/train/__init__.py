"""A training run: prepare and write (`run`), the loop, the step's losses, methods, optimizers, resume, monitor."""
