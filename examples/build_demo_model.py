"""Rebuild examples/tiny-llada, the small LLaDA-shaped checkpoint the README's
first command unlearns from. Its weights are random: it shows the mechanics of
a run end to end on a CPU in seconds, not forgetting of real knowledge.

    python examples/build_demo_model.py
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from tiny_models import build_llada  # noqa: E402

if __name__ == "__main__":
    target = HERE / "tiny-llada"
    build_llada(target, seed=0)
    print(f"wrote {target}")
