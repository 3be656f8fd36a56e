"""What the click-based benchmark scripts share: a one-line error with exit status 2, and the
entry point that turns click's exceptions into that status for tests and ``__main__``."""

from __future__ import annotations

import click


class CliError(click.ClickException):
    """A one-line error; the script exits with status 2."""

    exit_code = 2


def run(command: click.Command, argv: list[str] | None = None) -> int:
    """Run ``command`` on ``argv`` (default: the process's arguments) and return the exit status."""
    try:
        command.main(argv, standalone_mode=False)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    return 0
