"""User-facing errors: one clear line and a non-zero exit, without a traceback."""
from __future__ import annotations

import sys


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad flag, a bad line of data), found
    before training starts.

    The message is one line: what happened, where, and what to do. ``run_cli`` prints it
    as ``error: <message>`` and exits with ``exit_code`` (2), without a traceback.
    """
    exit_code = 2


class RunHalted(UserError):
    """A run that stopped itself during training after saving what could be saved (too many
    non-finite steps in a row, a save that failed). Exit status 3."""
    exit_code = 3


def check_args(args, *problem_checks) -> None:
    """Every problem the ``*_problems(args) -> [messages]`` functions find, raised at once as one
    line (a UserError), before any model or data is loaded."""
    problems = [p for check in problem_checks for p in check(args)]
    if problems:
        raise UserError("; ".join(problems))


def run_cli(main, parse_args, argv=None):
    """Run a script's ``main(parse_args(argv))``, turning a UserError into one line and its exit status."""
    try:
        return main(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
