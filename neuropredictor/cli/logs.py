"""Where log lines go: the terminal shows the progress bar, the summary and our own warnings; everything
else (Prefect's lines, libraries' warnings, full tracebacks) goes to a log file named in the summary.
With -v the log lines are shown on the terminal too."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from rich.logging import RichHandler
from rich.markup import escape

from neuropredictor.cli.app import err_console
from neuropredictor.cli.options import as_flags
from neuropredictor.redact import redact_text

LOG_DIR_ENV = "NEUROPREDICTOR_LOG_DIR"
_KEEP = 20  # log files kept: the newest ones


class _State:
    captured: Any = None  # logging's own warnings hook, for warnings that are not ours
    verbose = False
    file: Path | None = None
    handler: logging.Handler | None = None
    installed: tuple[logging.Handler, ...] = ()  # removed by the next setup (commands run in one process in tests)


STATE = _State()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """Our own warnings (AlignmentWarning: stimuli left out of a fit) reach the terminal as our log lines;
    other libraries' go to the log file only."""
    if category.__module__.split(".")[0] == "neuropredictor":
        logging.getLogger(category.__module__).warning("%s", message)
    else:
        STATE.captured(message, category, filename, lineno, file, line)


def log_dir() -> Path:
    return Path(os.environ.get(LOG_DIR_ENV) or Path.home() / ".cache" / "neuropredictor" / "logs")


def _prune(folder: Path) -> None:
    old = sorted(folder.glob("neuropredictor-*.log"), key=lambda p: p.stat().st_mtime)[:-_KEEP]
    for path in old:
        path.unlink(missing_ok=True)


class _Redacted(logging.Formatter):
    """Lines with credentials in URLs or signed query strings masked, whoever wrote them (a library's error
    can quote a signed URL); tracebacks too."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class _AsFlags(_Redacted):
    """On the terminal, the parameters our own lines name read as this command line's flags (other
    libraries' lines and tracebacks are shown as they are, but redacted)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = super().formatMessage(record)
        return as_flags(message) if record.name.split(".")[0] == "neuropredictor" else message


def setup(verbose: bool) -> None:
    """Route logging for one command: INFO and up to a new log file (created on the first line); on the
    terminal, our own warnings, or with verbose every INFO line."""
    root = logging.getLogger()
    for handler in STATE.installed:
        root.removeHandler(handler)
        handler.close()
    STATE.verbose = verbose
    folder = log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _prune(folder)
        STATE.file = folder / f"neuropredictor-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        STATE.handler = logging.FileHandler(STATE.file, delay=True, encoding="utf-8")
        STATE.handler.setFormatter(_Redacted("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    except OSError:  # no writable home: log lines stay on the terminal
        STATE.file, STATE.handler, verbose = None, None, True
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to the Prefect API
    terminal = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    terminal.setFormatter(_AsFlags())
    terminal.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        terminal.addFilter(lambda record: record.name.split(".")[0] == "neuropredictor")
    STATE.installed = (terminal,) + ((STATE.handler,) if STATE.handler else ())
    for handler in STATE.installed:
        root.addHandler(handler)
    logging.captureWarnings(True)  # library warnings become log lines: in the file, not on the terminal
    if warnings.showwarning is not _show_warning:
        STATE.captured, warnings.showwarning = warnings.showwarning, _show_warning
    if not verbose:
        # torchvision's own deprecation of its image decoders: nothing a user can act on
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def prepare_prefect() -> None:
    """Import Prefect for a command-line run and start its temporary server if no server is configured (in
    its own session, quiet, stopped when we end: neuropredictor_flows.temporary_server). Prefect's terminal
    handlers (set up at import) write to the log file instead, unless verbose. Prefect's loggers do not all
    propagate, so each handler is replaced where it hangs."""
    import prefect  # noqa: F401  (configures Prefect's logging)
    from neuropredictor_flows.temporary_server import ensure_server

    quiet = not STATE.verbose and STATE.file is not None
    ensure_server(output=open(STATE.file, "a", encoding="utf-8") if quiet else None)  # noqa: SIM115

    if STATE.verbose or STATE.handler is None:
        return
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)]
    for logger in loggers:
        if not isinstance(logger, logging.Logger):
            continue
        for handler in list(logger.handlers):
            if type(handler).__module__.startswith("prefect") and getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
                logger.removeHandler(handler)
                if not logger.propagate and STATE.handler not in logger.handlers:
                    logger.addHandler(STATE.handler)


def log_file() -> Path | None:
    """The log file of this command, if anything was written to it."""
    return STATE.file if STATE.file is not None and STATE.file.exists() else None


def report_crash(exc: BaseException) -> None:
    """An error that is not one of ours: one line on the terminal, the traceback in the log file (and on the
    terminal with -v)."""
    text = redact_text("".join(traceback.format_exception(exc)))
    if STATE.handler is not None:
        STATE.handler.emit(logging.LogRecord("neuropredictor.cli", logging.ERROR, __file__, 0, text, None, None))
    if STATE.verbose or STATE.handler is None:
        err_console.print(escape(text), highlight=False)
    where = f"the traceback is in {log_file()}" if log_file() else "run with -v for the traceback"
    line = redact_text(f"{type(exc).__name__}: {exc}")
    err_console.print(f"[bold red]error:[/] {escape(line)} ({escape(where)})", highlight=False)
