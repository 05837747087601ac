"""Running an extraction from the terminal: the rich progress bar fed by the run's events, and the choice
between the library's loop and the Prefect flow."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from neuropredictor.cli.app import err_console
from neuropredictor.cli.interrupt import RESUME_MESSAGE, Stopped, interruptible
from neuropredictor.cli.logs import prepare_prefect
from neuropredictor.errors import NeuroPredictorError


def progress_bar():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8} img/s"), TextColumn("shards {task.fields[shards]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
        disable=not err_console.is_terminal and os.environ.get("NEUROPREDICTOR_PROGRESS") != "1",
    )


class ProgressListener:
    """The run's events (`neuropredictor.schedule.ProgressFn`) as updates of one task of a rich Progress.

    The rate is images per second of wall time over about the last `window_s` seconds, measured from the
    "planned" event on: the first batch's images count with the time they took, not over an instant."""

    def __init__(self, progress, task, clock: Callable[[], float] = time.perf_counter, window_s: float = 30.0) -> None:
        self.progress, self.task, self.clock, self.window_s = progress, task, clock, window_s
        self.seen = self.shards = self.of = 0
        self.samples: deque[tuple[float, int]] = deque([(clock(), 0)])  # (time, images seen by then)
        self._lock = threading.Lock()  # events come from one thread per device

    def __call__(self, event: str, data: dict) -> None:
        with self._lock:
            self._update(event, data)

    def _update(self, event: str, data: dict) -> None:
        if event == "planned":
            self.shards, self.of = data["committed_shards"], data["shards"]
            self.samples = deque([(self.clock(), self.seen)])
            # reset, not update: rows committed by earlier runs are not progress made now (ETA)
            self.progress.reset(self.task, total=data["rows"], completed=data["committed_rows"],
                                shards=f"{self.shards}/{self.of}", rate="-")
        elif event == "batch" and data["images"] < 0:  # a failed attempt's images, extracted again
            self.progress.update(self.task, advance=data["images"])
        elif event == "batch":
            now = self.clock()
            self.seen += data["images"]
            self.samples.append((now, self.seen))
            while len(self.samples) > 2 and self.samples[1][0] <= now - self.window_s:
                self.samples.popleft()  # keep one sample at or before the window's start
            t0, seen0 = self.samples[0]
            rate = (self.seen - seen0) / (now - t0) if now > t0 else None
            self.progress.update(self.task, advance=data["images"], rate="-" if rate is None else f"{rate:,.0f}")
        elif event == "shard":
            self.shards += 1
            # another run's shard: its rows count as done, not as this run's speed
            advance = data["record"].get("rows", 0) if data["record"].get("skipped") else 0
            self.progress.update(self.task, advance=advance, shards=f"{self.shards}/{self.of}")


def run_with_progress(config, use_prefect: bool | None = None) -> dict:
    """Run an extraction with a rich progress bar; returns the store's manifest.

    With a Prefect server configured (PREFECT_API_URL) or use_prefect=True, the run is the `extract` flow,
    run in this process and reported to that server (UI, artifacts). Otherwise the library runs the same
    shard loop directly (`neuropredictor.run`): same retries, same resume, no server to start.

    Ctrl-C raises Stopped (an Interrupted) once the run has stopped (see `neuropredictor.cli.interrupt`)."""
    from neuropredictor.store import FeatureStore

    use_prefect = prefect_configured() if use_prefect is None else use_prefect
    # Load the model while Prefect starts up: the flow's validate step finds it in the replica cache (not a
    # custom factory's: each run loads it again, `forget_self_loaded`, so warming it would load it twice).
    warm = None
    if use_prefect and not config.model.startswith("custom:"):
        warm = threading.Thread(target=_prewarm, args=(config,), daemon=True)
        warm.start()
    with interruptible() as interruption, progress_bar() as progress:
        task = progress.add_task("extract", total=None, rate="-", shards="-")
        listener = ProgressListener(progress, task)

        def on_event(event: str, data: dict) -> None:
            if event == "planned":
                interruption.extracting = True  # from now on, Ctrl-C lets the current batches finish
            listener(event, data)

        manifest = None  # the library's run returns it; the flow returns a summary, so it is read then
        try:
            if use_prefect:
                prepare_prefect()
                from neuropredictor_flows.extract import (
                    PROGRESS,
                    STOP,
                    ExtractParameters,
                    extract_flow,
                )

                tokens = PROGRESS.set(on_event), STOP.set(interruption.stop)
                try:
                    extract_flow(ExtractParameters(**config.model_dump()))
                finally:
                    PROGRESS.reset(tokens[0])
                    STOP.reset(tokens[1])
            else:
                from neuropredictor.schedule import run

                manifest = run(config, on_event=on_event, stop=interruption.stop)
        except BaseException as exc:
            if interruption.stop.is_set():  # whatever the run ended with (Interrupted, Prefect's CancelledRun)
                raise Stopped(RESUME_MESSAGE, interruption.signum) from exc
            if warm is not None:  # a process that exits inside torch's loading aborts ("terminate called ...")
                warm.join(timeout=_PREWARM_JOIN_S)
            if use_prefect and isinstance(exc, RuntimeError) and "Failed to reach API" in str(exc):
                raise NeuroPredictorError(f"{exc}: start the Prefect server, point PREFECT_API_URL at a running "
                                          "one, or run without Prefect (--no-prefect)") from exc
            raise
        finally:
            progress.refresh()
    return manifest if manifest is not None else FeatureStore.open(config.out, config.storage_options, mode="r").manifest


def run_flow(config) -> dict:
    from neuropredictor_flows.extract import ExtractParameters, extract_flow

    prepare_prefect()
    return extract_flow(ExtractParameters(**config.model_dump()))


def prefect_configured() -> bool:
    """Whether a Prefect server is configured: PREFECT_API_URL in the environment or in the active profile
    (read without importing Prefect, which costs a second of start-up)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return False
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return bool(profiles.get("profiles", {}).get(name, {}).get("PREFECT_API_URL"))


_PREWARM_JOIN_S = 30.0


def _prewarm(config) -> None:
    from neuropredictor import pipeline

    try:
        pipeline.get_runner(config)
    except Exception:
        pass  # the flow's validate step loads it again and reports the error properly
