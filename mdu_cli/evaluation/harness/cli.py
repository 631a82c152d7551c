"""`mdu-lm-eval`: lm-eval's own command line with the `mdu` model registered.

lm-eval 0.4 discovers no model plugins, so `lm_eval --model mdu` only works in
a process that has imported `mdu_cli.evaluation.harness.model`. This is that
process: every argument is lm-eval's, e.g.

    mdu-lm-eval --model mdu --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,mc_samples=128 \\
        --tasks mmlu,truthfulqa_mc1 --batch_size 16
"""

from __future__ import annotations

import sys


def main() -> None:
    from mdu_cli.errors import MduError, printable
    from mdu_cli.evaluation.harness import require_lm_eval

    try:
        require_lm_eval()
    except MduError as err:
        print(f"Error: {printable(str(err))}", file=sys.stderr)
        sys.exit(1)
    from lm_eval.__main__ import cli_evaluate

    import mdu_cli.evaluation.harness.model  # noqa: F401  registers --model mdu

    cli_evaluate()


if __name__ == "__main__":
    main()
