"""What the command line shows: the rich Console of tables and progress, and the one-line errors.

Every subcommand (`lolcats.cli`, `lolcats.generation`, `lolcats.eval.cli`) reports a failure through
`report_error` and the thread note through `announce_threads`, from here (below all of them).
"""
from __future__ import annotations

import argparse
import os
import sys

from lolcats.errors import LolcatsError, StorageError, TrainError, one_line

EXIT_USAGE = 2

# off a terminal rich assumes 80 columns, which splits table rows and the final "saved to" line of
# logs and CI output; COLUMNS, when set, still wins
WIDTH_OFF_TERMINAL = 200


def make_console(*, stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = WIDTH_OFF_TERMINAL
    return console


def _error_line(message: str) -> None:
    """One line on stderr, never wrapped."""
    sys.stderr.flush()
    print(" ".join(str(message).split()), file=sys.stderr, flush=True)


def report_error(command: str, e: BaseException, say=_error_line) -> int:
    """The one way a failure reaches the user: `lolcats CMD: error: MESSAGE` (one line); the exit code.

    A LolcatsError carries its exit code (2: bad input, 1: training failed); an OSError that got
    this far (disk full, permissions) is bad input for the user to fix, said in one line too."""
    if isinstance(e, OSError) and not isinstance(e, LolcatsError):
        e = StorageError.wrap(e, doing="use")
    kind = "training failed" if isinstance(e, TrainError) else "error"
    say(f"lolcats {command}: {kind}: {one_line(e)}")
    return e.exit_code if isinstance(e, LolcatsError) else EXIT_USAGE


def announce_threads(args: argparse.Namespace) -> None:
    """The thread-count note of `main`, once the command's input checked out and the work starts
    (a bad path is still a one-line error)."""
    note = getattr(args, "threads_note", None)
    if note:
        _error_line(note)
        args.threads_note = None
