"""The rich Console the CLI prints its tables and progress with."""
from __future__ import annotations

import os

# off a terminal rich assumes 80 columns, which splits table rows and the final "saved to" line of
# logs and CI output; COLUMNS, when set, still wins
WIDTH_OFF_TERMINAL = 200


def make_console(*, stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = WIDTH_OFF_TERMINAL
    return console
