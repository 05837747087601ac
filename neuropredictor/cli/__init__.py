"""The `neuropredictor` command line. Heavy imports (torch, models) happen inside commands, so
`--help` and start-up stay fast. One module per group of commands; importing them registers them on `app`."""

from neuropredictor.cli import catalog, extract, encode, rsa, sweep, bench, entry  # noqa: F401, I001  (registers the commands, in help order)
from neuropredictor.cli.app import app
from neuropredictor.cli.entry import main
from neuropredictor.cli.options import as_flags

__all__ = ["app", "main", "as_flags"]
