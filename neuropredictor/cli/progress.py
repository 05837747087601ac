"""Running an extraction from the terminal: the rich progress bar fed by the run's events, and the choice
between the library's loop and the Prefect flow."""

from __future__ import annotations

import os
from pathlib import Path

from neuropredictor.cli.app import err_console


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


def run_with_progress(config, use_prefect: bool | None = None) -> dict:
    """Run an extraction with a rich progress bar; returns the store's manifest.

    With a Prefect server configured (PREFECT_API_URL) or use_prefect=True, the run is the `extract` flow,
    run in this process and reported to that server (UI, artifacts). Otherwise the library runs the same
    shard loop directly (`neuropredictor.run`): same retries, same resume, no server to start."""
    import threading
    import time

    from neuropredictor.store import FeatureStore

    use_prefect = prefect_configured() if use_prefect is None else use_prefect
    # Load the model while Prefect starts up: the flow's validate step finds it in the replica cache.
    if use_prefect:
        threading.Thread(target=_prewarm, args=(config,), daemon=True).start()
    with progress_bar() as progress:
        task = progress.add_task("extract", total=None, rate="-", shards="-")
        state = {"t0": None, "seen": 0, "shards": 0, "of": 0}

        def listener(event: str, data: dict) -> None:
            if event == "planned":
                state.update(shards=data["committed_shards"], of=data["shards"])
                progress.update(task, total=data["rows"], completed=data["committed_rows"],
                                shards=f"{state['shards']}/{state['of']}")
            elif event == "batch":
                state["t0"] = state["t0"] or time.perf_counter()
                state["seen"] += data["images"]
                rate = state["seen"] / max(time.perf_counter() - state["t0"], 1e-9)
                progress.update(task, advance=data["images"], rate=f"{rate:,.0f}")
            elif event == "shard":
                state["shards"] += 1
                progress.update(task, shards=f"{state['shards']}/{state['of']}")

        try:
            if use_prefect:
                from neuropredictor_flows.extract import (
                    PROGRESS,
                    ExtractParameters,
                    extract_flow,
                )
                from neuropredictor_flows.temporary_server import ensure_server

                ensure_server()  # without PREFECT_API_URL: a temporary server that dies with us
                token = PROGRESS.set(listener)
                try:
                    extract_flow(ExtractParameters(**config.model_dump()))
                finally:
                    PROGRESS.reset(token)
            else:
                from neuropredictor.schedule import run

                run(config, on_event=listener)
        finally:
            progress.refresh()
    return FeatureStore.open(config.out, config.storage_options, mode="r").manifest


def run_flow(config) -> dict:
    from neuropredictor_flows.extract import ExtractParameters, extract_flow
    from neuropredictor_flows.temporary_server import ensure_server

    ensure_server()
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


def _prewarm(config) -> None:
    from neuropredictor import pipeline

    try:
        pipeline.get_runner(config)
    except Exception:
        pass  # the flow's validate step loads it again and reports the error properly
