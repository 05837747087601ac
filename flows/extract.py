"""The `extract` flow: validate -> plan -> one task per shard group, on every device -> finalize.

Thin orchestration over `neuropredictor.pipeline`: retries, concurrency (one task per device, each
device holding one model replica for the whole run), artifacts in the UI. Resume comes from the store's
commit records, not from Prefect's caching: re-running the same parameters runs only missing shards.
"""

from __future__ import annotations

import json
import queue
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from neuropredictor import pipeline
from neuropredictor.corpus import Shard
from neuropredictor.errors import NeuroPredictorError
from neuropredictor.pipeline import ExtractConfig
from neuropredictor.store import FeatureStore


class ExtractParameters(ExtractConfig):
    """One extraction run: which images, which model and layers, where the features go, and how to run it."""

    devices: list[str] | None = Field(None, description="Devices to use, one model replica and one shard task "
                                      "each (e.g. ['cuda:0', 'cuda:1']). Default: every CUDA device, else the CPU.")
    shards_per_task: int = Field(1, ge=1, description="Shards handled by one task (fewer, longer tasks for "
                                 "corpora with thousands of small shards).")
    retries: int = Field(2, ge=0, description="Retries of a failed shard task before it counts as failed.")
    retry_delay_seconds: float = Field(10.0, ge=0, description="Delay before the first retry; doubles each retry, "
                                       "with jitter.")
    credentials_block: str | None = Field(None, description="Name of a Prefect Secret block holding the storage "
                                          "options (JSON, e.g. endpoint_url, key, secret) for s3:// URLs; never logged.")
    shards: list[str] | None = Field(None, description="Only these shards (by name); default all. The "
                                     "extract-distributed flow gives each child run its group.")
    finalize: bool = Field(True, description="Write the manifest at the end. Child runs of extract-distributed "
                           "leave it to their parent.")

    def library_config(self) -> ExtractConfig:
        """The library's config: storage options resolved from the credentials block, if one is named."""
        fields = self.model_dump(include=set(ExtractConfig.model_fields))
        if self.credentials_block:
            from prefect.blocks.system import Secret

            secret = Secret.load(self.credentials_block).get()
            options = secret if isinstance(secret, dict) else json.loads(secret)
            fields["storage_options"] = {**(self.storage_options or {}), **options}
        return ExtractConfig(**fields)

    def resolved_devices(self) -> list[str]:
        if self.devices:
            return list(self.devices)
        if self.device != "auto":
            return [self.device]
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(config: ExtractConfig) -> list[Shard]:
    """Model, layers, corpus and output are checked before anything is written."""
    return pipeline.validate(config)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(config: ExtractConfig, shards: list[Shard]) -> dict:
    store = pipeline.plan(config, shards)
    return {"shards": len(store.shards), "rows": store.rows}


@task(name="extract-shards", task_run_name="{label}", cache_policy=NO_CACHE)
def extract_shards_task(config: ExtractConfig, shards: list[Shard], devices: queue.Queue, label: str) -> list[dict]:
    """Extract a group of shards on a free device. A shard that raises is recorded as failed (with the
    attempt number) and the task fails, so Prefect retries it; committed shards are skipped on retry."""
    logger = get_run_logger()
    attempt = task_run.run_count or 1
    device = devices.get(timeout=3600)  # never blocks in practice: one task per device runs at a time
    try:
        store = FeatureStore.open(config.out, config.storage_options)
        records = []
        for shard in shards:
            try:
                record = pipeline.extract_shard(config, shard, store=store, device=device, attempt=attempt)
            except Exception as exc:
                store.record_failure(shard, f"{type(exc).__name__}: {exc}", attempts=attempt)
                raise
            if not record.get("skipped"):
                logger.info("%s: %d images in %.1f s (%.1f img/s) on %s", shard.name, shard.count,
                            record["duration_s"], record["images_per_s"] or 0, record["device"])
            records.append(record | {"shard": shard.name})
        return records
    finally:
        devices.put(device)


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(config: ExtractConfig) -> dict:
    return pipeline.finalize(config)


def _groups(shards: list[Shard], size: int) -> list[list[Shard]]:
    return [shards[i:i + size] for i in range(0, len(shards), size)]


def _label(group: list[Shard]) -> str:
    return group[0].name if len(group) == 1 else f"{group[0].name}..{group[-1].name}"


@flow(name="extract", task_runner=ThreadPoolTaskRunner(max_workers=64), validate_parameters=True)
def extract_flow(params: ExtractParameters) -> dict:
    """Extract layer activations of one model over a WebDataset corpus into a Zarr store.

    Re-running with the same parameters resumes: committed shards are skipped.
    """
    logger = get_run_logger()
    config = params.library_config()
    devices = params.resolved_devices()
    shards = validate_task(config)
    planned = plan_task(config, shards)
    store = FeatureStore.open(config.out, config.storage_options)
    done = store.committed()  # one listing, not one request per shard
    todo = [s for s in _selected(store.shards, params.shards) if s.name not in done]
    logger.info("%d of %d shards to extract (%d rows) on %s", len(todo), planned["shards"],
                sum(s.count for s in todo), ", ".join(devices))
    total_rows = max(store.rows, 1)
    done_rows = store.rows - sum(s.count for s in todo)
    progress_id = create_progress_artifact(progress=100.0 * done_rows / total_rows, key="extract-progress",
                                           description=f"Rows of {config.out} committed")
    free: queue.Queue = queue.Queue()
    for device in devices:
        free.put(device)
    shard_task = extract_shards_task.with_options(
        retries=params.retries,
        retry_delay_seconds=[params.retry_delay_seconds * 2**i for i in range(max(params.retries, 1))],
        retry_jitter_factor=0.5,
    )
    # A sliding window of one task per device: each takes a free device (its replica) and gives it back.
    groups = iter(_groups(todo, params.shards_per_task))
    running: dict[Any, list[Shard]] = {}

    def launch() -> None:
        group = next(groups, None)
        if group is not None:
            running[shard_task.submit(config, group, free, _label(group))] = group

    for _ in devices:
        launch()
    failed: dict[str, str] = {}
    while running:
        future = next(as_completed(list(running)))
        group = running.pop(future)
        if not future.state.is_completed():
            error = _state_error(future)
            failed.update({s.name: error for s in group if not store.is_committed(s.name)})
        done_rows += sum(s.count for s in group if s.name not in failed)
        update_progress_artifact(progress_id, progress=100.0 * done_rows / total_rows)
        launch()
    if not params.finalize:
        if failed:
            raise NeuroPredictorError(pipeline.failure_message(failed))
        return {"status": "shards-done", "shards": {s.name: "committed" for s in todo}}
    manifest = finalize_task(config)
    report_artifacts(config, manifest)
    if failed:
        raise NeuroPredictorError(pipeline.failure_message(failed))
    return summarize(manifest)


def _selected(shards: list[Shard], names: list[str] | None) -> list[Shard]:
    if names is None:
        return shards
    unknown = sorted(set(names) - {s.name for s in shards})
    if unknown:
        raise NeuroPredictorError(f"shards {unknown[:5]} are not in the corpus of this store")
    wanted = set(names)
    return [s for s in shards if s.name in wanted]


def _state_error(future: Any) -> str:
    try:
        future.result()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return str(future.state.message)


def summarize(manifest: dict) -> dict:
    return {"status": manifest["status"], "rows": manifest["rows"], "config_hash": manifest["config_hash"],
            "shards": {s["name"]: s["status"] for s in manifest["shards"]}}


def report_artifacts(config: ExtractConfig, manifest: dict) -> None:
    """Artifacts a user reads in the UI: the layers table, per-shard throughput, where the output is."""
    create_table_artifact(
        key="extract-layers",
        table=[{"layer": layer["name"], "shape": "(N, " + ", ".join(map(str, layer["shape"])) + ")",
                "dtype": layer["dtype"], "reduction": layer["reduction"]} for layer in manifest["layers"]],
        description=f"Layers of {manifest['config']['model']} stored in {config.out}",
    )
    create_table_artifact(
        key="extract-shards",
        table=[{"shard": s["name"], "status": s["status"], "images": s["count"], "attempts": s.get("attempts"),
                "seconds": s.get("duration_s"), "images/s": s.get("images_per_s"), "device": s.get("device"),
                "host": s.get("host")} for s in manifest["shards"]],
        description="Per-shard status and throughput",
    )
    rows = manifest["rows"]
    bad = manifest.get("bad_samples", [])
    create_markdown_artifact(
        key="extract-summary",
        markdown=(
            f"# Extraction {manifest['status']}\n\n"
            f"- **Output**: `{config.out}`\n- **Model**: `{manifest['config']['model']}` "
            f"(weights `{manifest['config']['weights']}`)\n"
            f"- **Rows**: {rows['committed']} of {rows['total']} written, {rows['invalid']} invalid images\n"
            f"- **Config hash**: `{manifest['config_hash'][:16]}`\n\n"
            + (f"Bad images: " + ", ".join(f"`{b['key']}` ({b['reason']})" for b in bad[:10]) + "\n\n" if bad else "")
            + "## Open it\n\n```python\nimport neuropredictor\n"
            f"ds = neuropredictor.open_features({config.out!r})\n```\n\n"
            f"```bash\nneuropredictor inspect {config.out}\n```\n"
        ),
        description="Where the features are and how to read them",
    )
