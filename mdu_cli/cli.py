"""The `mdu` command group, and the one place where errors become exit codes.

Commands live in `mdu_cli/commands/`; each parses its options, calls one
library function and prints the result.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from mdu_cli import __version__
from mdu_cli.errors import ConfigError, DataError, Interrupted, MduError, printable

DEBUG_VARIABLE = "MDU_DEBUG"


class Failure(click.ClickException):
    """Printed as one `Error: ...` line per problem, no traceback."""

    def __init__(self, lines: list[str], exit_code: int = 1):
        super().__init__(lines[0])
        self.lines = lines
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        # Each problem on exactly one line: messages can quote file names and
        # library errors, which may hold newlines or terminal escapes.
        for line in self.lines:
            click.echo(f"Error: {printable(line)}", err=True)


# name -> (module, attribute). Commands are imported when run or listed, so
# `mdu diff` does not pay for the imports of `mdu unlearn` (torch among them).
COMMANDS = {
    "unlearn": ("mdu_cli.commands.unlearn", "unlearn"),
    "finetune": ("mdu_cli.commands.finetune", "finetune"),
    "diff": ("mdu_cli.commands.diff", "diff"),
    "push": ("mdu_cli.commands.push", "push"),
    "eval": ("mdu_cli.commands.evaluate", "eval_command"),
    "generate": ("mdu_cli.commands.evaluate", "generate_command"),
    "corpus": ("mdu_cli.commands.corpus", "corpus"),
}


class MduGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return None
        import importlib

        module, attribute = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        debug = bool(os.environ.get(DEBUG_VARIABLE))
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except DataError as err:
            if debug:
                raise
            raise Failure(err.problems, 1) from None
        except Interrupted as err:
            if os.environ.get("RANK", "0") != "0":
                sys.exit(130)  # in a multi-process run the main process says it once
            raise Failure([str(err)], 130) from None
        except ConfigError as err:
            if debug:
                raise
            raise Failure([str(err)], 2) from None
        except MduError as err:
            if debug:
                raise
            raise Failure([str(err)], 1) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted; no output was written.", err=True)
            sys.exit(130)
        except Exception as err:
            if debug:
                raise
            known = _known_failure(err)
            if known:
                raise Failure([known], 1) from None
            raise Failure([f"unexpected {type(err).__name__}: {err} "
                           f"(set {DEBUG_VARIABLE}=1 for the traceback)"]) from None


def _known_failure(err: Exception) -> str | None:
    """Library failures that the user's machine or settings cause, said as what to do."""
    import errno

    text = str(err)
    if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in text \
            or "StorageFull" in text:
        where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
        return (f"no space left on the device{where} while writing; free some space (or choose another --out or "
                "HF_HOME) and run again: nothing half-written was published")
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        where = err.filename or "a file"
        return f"cannot write {where} ({err.strerror}); choose a writable location and run again"
    level = os.environ.get("ATEN_CPU_CAPABILITY")
    if isinstance(err, RuntimeError) and level and "only supported when avx512 is supported" in text:
        # torch 2.13's bf16 attention on an AVX-512-BF16 CPU takes a packing
        # path that a lowered kernel level then refuses.
        return (f"torch's bf16 kernels on this CPU need its native kernel level, and ATEN_CPU_CAPABILITY={level} "
                "lowers it; unset ATEN_CPU_CAPABILITY, or run with --dtype fp32")
    return None


class _StderrHandler(logging.Handler):
    """Writes to whatever stderr is at the time of the message (Click's test
    runner swaps it), one plain line per record."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def setup_logging() -> None:
    """Notices and warnings on stderr, plain, so stdout carries only data."""
    logger = logging.getLogger("mdu")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # transformers' own advice (e.g. about weights it initialised) is noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@click.group(cls=MduGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mdu")
def cli() -> None:
    """Machine unlearning for masked diffusion language models (LLaDA, Dream, masked-LMs).

    \b
    Examples:
      mdu unlearn --model GSAI-ML/LLaDA-8B-Instruct --forget data.jsonl --tau 2.0
      mdu unlearn --config examples/run.yaml
      mdu diff GSAI-ML/LLaDA-8B-Instruct ./LLaDA-8B-Instruct-mdu-tau2
      mdu push ./LLaDA-8B-Instruct-mdu-tau2 --repo-id me/llada-forgot-x
      mdu eval ./LLaDA-8B-Instruct-mdu-tau2 --benchmark tofu --reference retain90/eval.json
    """
    setup_logging()


def main() -> None:
    cli(prog_name="mdu")
