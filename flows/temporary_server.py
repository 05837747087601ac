"""Prefect's temporary server, when no Prefect API is configured: started here, before a flow runs, so that

- it runs in its own session, so that a Ctrl-C at the terminal reaches this process only and the flow run
  can still report how it ended (a server killed under a running flow made it retry for minutes);
- its own output goes where the caller says (the command line's log file), not to the terminal;
- it never outlives this process: Prefect stops it at exit (atexit), but a process ended by a signal
  (SIGTERM's default action, SIGKILL, the OOM killer) runs no atexit hooks, and Prefect offers no hook to
  start it with a parent-death signal. A small watcher process, started with the server (not once it
  answers: a kill during its start-up left it running), notices this process is gone and stops the server
  (SIGTERM, then SIGKILL after 5 s);
- an offline machine logs no telemetry errors (its analytics are turned off, server and client side);
- a server that does not start in time is one clear error, not Prefect's traceback.

Prefect's own code path then finds the server already running (one `SubprocessASGIServer` per process).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types
from typing import IO

from neuropredictor.errors import NeuroPredictorError, first_line

# Telemetry off for the server we cause (a user's explicit setting wins): offline it logs an ERROR per run.
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}

_WATCHER = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])

def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False

while os.getppid() == parent:  # reparented: the process that started the server is gone
    if not alive(server):
        sys.exit(0)  # stopped as usual (atexit)
    time.sleep(0.5)
if alive(server):
    os.kill(server, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not alive(server):
            sys.exit(0)
    os.kill(server, signal.SIGKILL)
"""


def _server_class(output: IO | None) -> type:
    """Prefect's SubprocessASGIServer, started in a session of its own and writing to output."""
    import prefect.server.api.server as server_module

    extra = {"start_new_session": os.name == "posix"}
    if output is not None:
        extra.update(stdout=output, stderr=subprocess.STDOUT)

    class DetachedServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            module = server_module.subprocess  # Prefect's own reference to subprocess, swapped for this call
            server_module.subprocess = types.SimpleNamespace(Popen=functools.partial(subprocess.Popen, **extra))
            try:
                process = super()._run_uvicorn_command()
            finally:
                server_module.subprocess = module
            _watch(process.pid)  # now, not once it answers: a kill while it starts (seconds) must stop it too
            return process

    return DetachedServer


def _watch(server_pid: int) -> None:
    """A watcher that stops the server once this process is gone (its own session: a Ctrl-C at the terminal
    is for us, not for the watcher)."""
    subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(os.getpid()), str(server_pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True, start_new_session=True,
    )


def ensure_server(output: IO | None = None) -> str | None:
    """Start Prefect's temporary server now if no Prefect API is configured (returns its API URL), in its own
    session, its output to `output` (default: inherited), with a watcher that stops it when this process
    ends, however it ends. None when an API is configured."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    server = _server_class(output)()  # registered as Prefect's instance: get_client() reuses it
    try:
        server.start()
    except RuntimeError as exc:
        raise NeuroPredictorError(
            f"Prefect's temporary server did not start: {first_line(exc)} Set PREFECT_API_URL to a running "
            "server (`prefect server start`), allow it more time with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "
            "or run without `prefect`."
        ) from exc
    return server.api_url
