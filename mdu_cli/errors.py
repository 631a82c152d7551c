"""The error types the command line turns into one-line messages.

Library code raises these; `mdu_cli.cli` maps them to exit codes in one place,
so no command has to format errors itself.
"""


class MduError(Exception):
    """A domain problem the user can fix (bad data line, model without a mask
    token, output directory in the way). Exit code 1, one line, no traceback."""


class ConfigError(MduError):
    """A bad option value, from a flag or from the YAML file. Exit code 2, like
    Click's own usage errors."""


class DataError(MduError):
    """One or more bad records. `problems` holds one `FILE:LINE: ...` string per
    bad record so that every one of them can be reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(problems[0] if problems else "bad data")


class Interrupted(MduError):
    """Ctrl-C during training, after the state was saved. Exit code 130."""
