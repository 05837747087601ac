"""The `extract` flow: validate -> plan -> one task per group of shards, on every device -> finalize.

Thin orchestration over `neuropredictor.pipeline` and `neuropredictor.schedule`: the same groups, device
window, retry delays and failure records as `neuropredictor.run`, with Prefect's retries, task states
and artifacts in the UI. Resume comes from the store's commit records, not from Prefect's caching:
re-running the same parameters runs only missing shards.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from neuropredictor_flows.artifacts import artifact_key, shard_rows
from neuropredictor_flows.paths import refuse_relative_paths
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
from prefect.states import Cancelled, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import Field, field_validator

from neuropredictor import pipeline, schedule
from neuropredictor.config import ExtractConfig
from neuropredictor.errors import ConfigMismatchError, Interrupted, NeuroPredictorError
from neuropredictor.manifest import canonical
from neuropredictor.pipeline.readahead import Readahead
from neuropredictor.redact import redact, redact_text, secret_name_pattern
from neuropredictor.shard import Shard
from neuropredictor.store import FeatureStore

# The terminal's progress bar, when the command line runs this flow in its own process; deployments run
# without one. A context variable, so that it reaches the task threads (Prefect copies the context).
PROGRESS: ContextVar[Callable[[str, dict], None] | None] = ContextVar("neuropredictor_progress", default=None)
# Set by the command line's Ctrl-C, or by the flow when its run is cancelled: the shard tasks end after their
# current batch (uncommitted shards run again next time), no new ones start, and the flow run ends Cancelled
# without finalizing.
STOP: ContextVar[threading.Event | None] = ContextVar("neuropredictor_stop", default=None)

INTERRUPTED = "interrupted: committed shards are kept; run the same command again to resume"


def no_credentials(cls: type, value: dict | None) -> dict | None:
    """Validator of `storage_options` parameters: flow parameters are kept in Prefect's database and shown in
    its UI, never a place for secrets."""
    if value and redact(value) != canonical(value):
        raise ValueError("storage_options must not hold credentials in a flow run's parameters (Prefect stores "
                         "and shows them): put them in a Prefect Secret block and pass credentials_block=NAME, "
                         "or give the workers AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in their environment. "
                         "Options without secrets (endpoint_url, ...) are fine here.")
    return value


_SCHEMA_DEPTH = 5  # nested option mappings the schema looks into (s3fs: client_kwargs, config_kwargs, ...)


def parameter_storage_options() -> Any:
    """The `storage_options` field of flow parameters: the JSON schema refuses option names that hold
    credentials, at the top and in nested mappings (`client_kwargs`, ...), so that a Prefect server refuses
    such a run (a deployment enforces its parameter schema) before it stores the parameters; `no_credentials`
    checks every depth when the run starts."""
    level: dict[str, Any] = {}
    for _ in range(_SCHEMA_DEPTH):  # a schema without $ref: it is inlined in the flow's parameter schema
        # propertyNames / additionalProperties constrain objects only: other values pass
        level = {"propertyNames": {"not": {"pattern": secret_name_pattern()}}, **({"additionalProperties": level}
                                                                               if level else {})}
    return Field(None, repr=False, description=ExtractConfig.model_fields["storage_options"].description
                 + " No credentials here (Prefect stores a run's parameters): name a Secret block in "
                 "credentials_block.",
                 json_schema_extra=level)


def resolve_credentials(storage_options: dict | None, block: str | None) -> dict | None:
    """The storage options with the Secret block's (JSON) options on top, when a block is named."""
    if not block:
        return storage_options
    from prefect.blocks.system import Secret

    secret = Secret.load(block).get()
    try:
        options = secret if isinstance(secret, dict) else json.loads(secret)
    except (TypeError, ValueError):
        options = None
    if not isinstance(options, dict):  # what it holds is not shown: it is a secret
        raise ValueError(f"the Secret block {block!r} must hold the storage options as a JSON object, e.g. "
                         '{"key": ..., "secret": ..., "endpoint_url": ...}; it holds something else')
    return {**(storage_options or {}), **options}


class ExtractParameters(ExtractConfig):
    """One extraction run: which images, which model and layers, where the features go, and how to run it."""

    storage_options: dict[str, Any] | None = parameter_storage_options()
    shards_per_task: int = Field(1, ge=1, description="Shards handled by one task (fewer, longer tasks for "
                                 "corpora with thousands of small shards).")
    credentials_block: str | None = Field(None, description="Name of a Prefect Secret block holding the storage "
                                          "options (JSON, e.g. endpoint_url, key, secret) for s3:// URLs; never logged.")
    shards: list[str] | None = Field(None, description="Only these shards (by name); default all. The "
                                     "extract-distributed flow gives each child run its group.")
    finalize: bool = Field(True, description="Write the manifest at the end. Child runs of extract-distributed "
                           "leave it to their parent.")

    _no_credentials = field_validator("storage_options")(no_credentials)

    def library_config(self) -> ExtractConfig:
        """The library's config: storage options resolved from the credentials block, if one is named."""
        fields = self.model_dump(include=set(ExtractConfig.model_fields))
        fields["storage_options"] = resolve_credentials(self.storage_options, self.credentials_block)
        return ExtractConfig(**fields)


def emit(event: str, data: dict) -> None:
    """An event to the terminal's progress, when the command line runs this flow (see PROGRESS)."""
    sink = PROGRESS.get()
    if sink is not None:
        sink(event, data)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(config: ExtractConfig) -> list[Shard]:
    """Model, layers, corpus and output are checked before anything is written."""
    return pipeline.validate(config)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(config: ExtractConfig, shards: list[Shard], scope: list[str] | None = None) -> dict:
    store = pipeline.plan(config, shards, scope)
    for line in pipeline.plan_messages(store):  # for the UI (the library's own log reaches the terminal)
        get_run_logger().warning(line)
    return {"shards": len(store.shards), "rows": store.rows, "committed": sorted(store.committed_at_plan or ()),
            "generation": store.generation}  # the store this run writes: tasks refuse a replacement of it


@task(name="extract-shards", task_run_name="{label}", cache_policy=NO_CACHE)
def extract_shards_task(config: ExtractConfig, shards: list[Shard], device: str, label: str,
                        store: FeatureStore, readahead: Readahead | None = None) -> list[dict] | State:
    """Extract a group of shards on its device into the flow's store (opened once, at the generation the
    flow planned: a store replaced since refuses its writers). A shard that raises is recorded as failed
    (with the attempt number) and the task fails, so Prefect retries it; committed shards are skipped on
    retry."""
    logger = get_run_logger()
    try:
        records = schedule.extract_group(config, shards, store, device, attempt=task_run.run_count or 1,
                                         on_batch=lambda n: emit("batch", {"images": n}), stop=STOP.get(),
                                         readahead=readahead)
    except Interrupted:  # not a failure: nothing to retry; Cancelled, not Completed, in the UI
        logger.info("%s: interrupted; its uncommitted shards run again next time", label)
        return Cancelled(message=f"{label}: interrupted; its uncommitted shards run again next time")
    for record in records:
        if not record.get("skipped"):
            logger.info("%s: %d images in %.1f s (%.1f img/s) on %s", record["shard"], record["rows"],
                        record["duration_s"], record["images_per_s"] or 0, record["device"])
        elif schedule.done_elsewhere(record):
            logger.info("%s: extracted by another run (host %s)", record["shard"], record.get("host"))
        if schedule.news(record):
            emit("shard", {"name": record["shard"], "record": record})
    return records


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(config: ExtractConfig, generation: str) -> dict:
    return schedule.finalize(config, generation=generation)  # retried like shards, one clear error when it still fails


@flow(name="extract", task_runner=ThreadPoolTaskRunner(max_workers=64), validate_parameters=True)
def extract_flow(params: ExtractParameters) -> dict | State:
    """Extract layer activations of one model over a WebDataset corpus into a Zarr store.

    Re-running with the same parameters resumes: committed shards are skipped. Stopped through `STOP`
    (the command line's Ctrl-C), the run ends Cancelled, unfinalized.
    """
    logger = get_run_logger()
    config = params.library_config()
    refuse_relative_paths(config)
    devices = config.resolved_devices()
    shards = validate_task(config)
    # a child of extract-distributed (shards given, no finalize: its parent verified and finalizes) reads its
    # own group's commit records, not every one of the store
    planned = plan_task(config, shards, params.shards if not params.finalize else None)
    store = FeatureStore.open(config.out, config.storage_options, generation=planned["generation"])
    emit("planned", schedule.planned_event(store, planned))
    # the session first: replacing the store is refused while this run extracts into it, and runs that
    # find each other share the shards (`pending_groups`)
    with store.session() as session:
        groups = schedule.pending_groups(store, shards, params.shards, params.shards_per_task, planned,
                                         shared=store.shared(session))
        todo_rows = sum(s.count for g in groups for s in g)
        logger.info("%d of %d shards to extract (%d rows) on %s", sum(len(g) for g in groups), planned["shards"],
                    todo_rows, ", ".join(devices))
        # the rows of this run's shards (a child of extract-distributed has a group of them), not the store's
        scope = set(params.shards or ())
        scope_rows = sum(s.count for s in store.shards if not scope or s.name in scope)
        total_rows = max(scope_rows, 1)
        done_before = scope_rows - todo_rows
        progress_id = create_progress_artifact(progress=100.0 * done_before / total_rows,
                                               key=_progress_key(config.out, params.shards),
                                               description=f"Rows of {redact_text(config.out)} committed")
        policy = schedule.RetryPolicy.of(config)
        # not once cancelled: its groups end "interrupted", which says nothing of the storage
        window = schedule.DeviceWindow(groups, devices, probe=lambda group: None if stop.is_set() else
                                       schedule.storage_outage(store, group, config.storage_options))
        readahead = Readahead(window.upcoming)  # each device's next shard is read as its current one ends
        running: dict[Any, tuple[list[Shard], str]] = {}
        # a deployed run has no command line to set STOP: its own event, which its tasks see (submitted below)
        stop = STOP.get() or threading.Event()
        token = STOP.set(stop)
        try:
            while True:
                for group, device in ([] if stop.is_set() else window.start()):
                    # delays drawn per task: the groups of one run (one per GPU) do not retry in step either
                    task = extract_shards_task.with_options(retries=policy.retries,
                                                            retry_delay_seconds=policy.delays(),
                                                            retry_condition_fn=_worth_retrying)
                    # the flow's store object (quoted: Prefect need not walk it), not one opened per task, which
                    # read the whole plan and manifest for every shard (hundreds of MB at 10,000 shards)
                    future = task.submit(config, group, device, schedule.group_label(group), quote(store),
                                         quote(readahead))
                    running[future] = (group, device)
                if not running:
                    break
                future = next(as_completed(list(running)))
                group, device = running.pop(future)
                error = _state_error(future)
                if stop.is_set():
                    error = error or "interrupted"  # only its uncommitted shards count as not done
                window.finish(group, device, error, store.is_committed)
                update_progress_artifact(progress_id, progress=100.0 * (done_before + window.rows_done) / total_rows)
        except BaseException:
            # Cancelled from Prefect (its TerminationSignal arrives here), or the flow itself failing: the shard
            # tasks under way end after their batch, uncommitted, instead of holding the process until their
            # shards are done (or until the worker kills it, after its grace period)
            stop.set()
            raise
        finally:
            STOP.reset(token)
            readahead.close(wait=not stop.is_set())  # a cancelled run does not wait for a reader still opening
    if stop.is_set():
        logger.info(INTERRUPTED)
        return Cancelled(message=INTERRUPTED)
    if not params.finalize:
        if window.failed:
            raise NeuroPredictorError(schedule.failure_message(window.failed))
        return {"status": "shards-done", "shards": {s.name: "committed" for g in groups for s in g}}
    manifest = finalize_task(config, planned["generation"])
    report_artifacts(config, manifest)
    if window.failed:
        raise NeuroPredictorError(schedule.failure_message(window.failed))
    return summarize(manifest)


def _progress_key(out: str, shards: list[str] | None) -> str:
    """The progress artifact's key: the store's, and one per group of shards (children of extract-distributed
    run at once: one key for all showed whichever child wrote last), the same for a group launched again."""
    return artifact_key("extract-progress", out, *([schedule.group_label(sorted(shards))] if shards else []))


def _worth_retrying(task: Any, task_run: Any, state: State) -> bool:
    """Prefect's retry condition: not for a model that is not the store's (its file changed during the run),
    which stays so on every retry."""
    return not isinstance(state.data, ConfigMismatchError)


def _state_error(future: Any) -> str | None:
    """The task's error, None when it completed: from its result, which waits for the final state (the
    state a future holds when it is done may still lag behind the server's)."""
    try:
        future.result()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def summarize(manifest: dict) -> dict:
    return {"status": manifest["status"], "rows": manifest["rows"], "config_hash": manifest["config_hash"],
            "shards": {s["name"]: s["status"] for s in manifest["shards"]}}


def report_artifacts(config: ExtractConfig, manifest: dict) -> None:
    """Artifacts a user reads in the UI: the layers table, per-shard throughput, where the output is (its URL
    without a password or signed query values)."""
    out = redact_text(config.out)
    create_table_artifact(
        key=artifact_key("extract-layers", config.out),
        table=[{"layer": layer["name"], "shape": "(N, " + ", ".join(map(str, layer["shape"])) + ")",
                "dtype": layer["dtype"], "reduction": layer["reduction"]} for layer in manifest["layers"]],
        description=f"Layers of {manifest['config']['model']} stored in {out}",
    )
    shards, what = shard_rows(manifest["shards"])
    create_table_artifact(
        key=artifact_key("extract-shards", config.out),
        table=[{"shard": s["name"], "status": s["status"], "images": s["count"], "attempts": s.get("attempts"),
                "seconds": s.get("duration_s"), "images/s": s.get("images_per_s"), "device": s.get("device"),
                "host": s.get("host")} for s in shards],
        description=what,
    )
    rows = manifest["rows"]
    bad = manifest.get("bad_samples", [])
    create_markdown_artifact(
        key=artifact_key("extract-summary", config.out),
        markdown=(
            f"# Extraction {manifest['status']}\n\n"
            f"- **Output**: `{out}`\n- **Model**: `{manifest['config']['model']}` "
            f"(weights `{manifest['config']['weights']}`)\n"
            f"- **Rows**: {rows['committed']} of {rows['total']} written, {rows['invalid']} invalid images\n"
            f"- **Config hash**: `{manifest['config_hash'][:16]}`\n\n"
            + ("Bad images: " + ", ".join(f"`{b['key']}` ({b['reason']})" for b in bad[:10]) + "\n\n" if bad else "")
            + "## Open it\n\n```python\nimport neuropredictor\n"
            f"ds = neuropredictor.open_features({out!r})\n```\n\n"
            f"```bash\nneuropredictor inspect {out}\n```\n"
        ),
        description="Where the features are and how to read them",
    )
