"""User-facing errors: one clear line, a non-zero exit, before any training starts."""
from __future__ import annotations

import sys


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad flag, a bad line of data).

    The message is one line: what happened, where, and what to do. ``run_cli`` prints it
    as ``error: <message>`` and exits with status 2, without a traceback.
    """


def run_cli(main, parse_args, argv=None):
    """Run a script's ``main(parse_args(argv))``, turning a UserError into one line and exit 2."""
    try:
        return main(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
