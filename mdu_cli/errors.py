"""The error types the command line turns into one-line messages.

Library code raises these; `mdu_cli.cli` maps them to exit codes in one place,
so no command has to format errors itself.
"""

import re

# C0 and C1 control characters, DEL, and the Unicode line and paragraph
# separators: a file name or a record holding one could otherwise split a
# message over lines or send escape sequences to the user's terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object) -> str:
    """`text` on one line with every control character written as an escape
    (`\\n`, `\\x1b`), so that a name a user (or an attacker) chose can be shown
    safely in a listing or an error."""
    def escape(match: re.Match) -> str:
        char = match.group(0)
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{ord(char):02x}" if ord(char) < 256
                                                           else f"\\u{ord(char):04x}")

    # A lone surrogate (from a JSON "\ud800" escape) cannot be encoded to
    # UTF-8 and would crash the print itself.
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(escape, text)


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
