"""Ctrl-C during `extract`: the first one stops the run after the current batch (committed shards stay
committed, nothing half-written is committed), a second one stops at once. (Prefect's temporary server
runs in a session of its own, so that Ctrl-C reaches this process only: neuropredictor_flows.temporary_server.)"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.markup import escape

from neuropredictor.cli.app import err_console
from neuropredictor.errors import Interrupted


class Stopped(Interrupted):
    """The run stopped on a signal; exit_code is what shells report for it (128 + the signal: 130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class Interruption:
    """The run's stop event and how far the run got: before its plan, Ctrl-C stops at once (validating
    and planning are redone by the next run); after it, the shards end after their current batch."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.extracting = False
        self.pid = os.getpid()
        self.signum = int(signal.SIGINT)  # the last signal received

    def handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self.pid:
            return  # a forked decode worker (it inherits the handler): this process stops it
        self.signum = signum
        if signum != signal.SIGINT or self.stop.is_set() or not self.extracting:
            self.stop.set()
            raise KeyboardInterrupt
        self.stop.set()
        err_console.print("stopping after the current batch (Ctrl-C again to stop at once) ...", highlight=False)


# SIGTERM (kill) and SIGHUP (the terminal closed) stop at once, but as an exception, not by dying: the
# temporary server, which is outside the terminal's process group, is stopped at exit too.
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def interruptible() -> Iterator[Interruption]:
    """Ctrl-C (and SIGTERM, SIGHUP) handled by an `Interruption` while the block runs (in the main thread;
    elsewhere signals are left as they are)."""
    interruption = Interruption()
    if threading.current_thread() is not threading.main_thread():
        yield interruption
        return
    previous = {sig: signal.signal(sig, interruption.handle) for sig in _SIGNALS}
    try:
        yield interruption
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


RESUME_MESSAGE = ("interrupted: committed shards are kept (those in progress were not committed); run the same "
                  "`neuropredictor` command again to resume.")


def interrupted(exc: BaseException, message: str = RESUME_MESSAGE) -> NoReturn:
    """What the command does once the run stopped: one line saying so and how to resume, and the exit code
    of the signal (130 for Ctrl-C)."""
    err_console.print(f"[bold yellow]{escape(message)}[/]", highlight=False)
    raise typer.Exit(getattr(exc, "exit_code", 128 + signal.SIGINT))
