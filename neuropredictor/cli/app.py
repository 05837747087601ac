"""The Typer application and its consoles; the command modules register on it."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    help="Extract activations of vision models over large image sets, resumably, into Zarr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
shards_app = typer.Typer(help="Make and inspect WebDataset shards.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
console = Console()
err_console = Console(stderr=True)
