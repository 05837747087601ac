"""The Typer application and its consoles; the command modules register on it."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup


class _OnceGroup(TyperGroup):
    """Commands whose options of one value refuse being given twice: click keeps the last, so
    `--model a --model b` extracted b alone without a word."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        command = self.get_command(ctx, args[at]) if at is not None else None
        if command is not None and not hasattr(command, "commands"):  # a group checks its own commands
            # (Typer's own copy of click: its classes are not click's, so parameters are told by their kind)
            once = {flag: p for p in command.params if p.param_type_name == "option"
                    and not (p.multiple or p.is_flag or p.count) for flag in p.opts}
            seen: set[str] = set()
            for arg in args[at + 1:]:
                param = once.get(arg.split("=", 1)[0])
                if param is not None and param.name in seen:
                    hint = " (several models: neuropredictor sweep --models A,B)" if param.name == "model" else ""
                    ctx.fail(f"{param.opts[0]} is given more than once; give it once{hint}")
                if param is not None:
                    seen.add(param.name)
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_OnceGroup,
    help="Extract activations of vision models over large image sets, resumably, into Zarr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
shards_app = typer.Typer(cls=_OnceGroup, help="Make and inspect WebDataset shards.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
console = Console()
err_console = Console(stderr=True)
