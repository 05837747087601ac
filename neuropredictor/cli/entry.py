"""The entry point: global options, and the last line of defence that turns an unexpected error into one
line on the terminal (its traceback goes to the log file)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from neuropredictor.cli import logs
from neuropredictor.cli.app import app


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show log lines (Prefect's too) and full "
                                          "tracebacks on the terminal; they always go to the log file.")] = False,
) -> None:
    """Extract activations of vision models over large image sets, resumably, into Zarr."""
    logs.setup(verbose)


def main() -> None:
    try:
        app(prog_name="neuropredictor")
    except Exception as exc:  # ours are caught in the commands; this is a bug or an environment problem
        logs.report_crash(exc)
        sys.exit(1)
