"""The `extract-sweep` flow: many models over one stimulus set, then the comparison on the brain data.

Thin orchestration over `neuropredictor.sweep`. On one worker, each model is an `extract` subflow run, one
after another (one replica per device at a time). With `deployment` set (e.g. `extract/gpu`), each model is
a child run of that deployment, at most `max_in_flight` at once, so a cluster's GPU pool takes them in
parallel; the parent waits for them with one request per poll for every 200 of them, and cancels those still
running when it ends. Then each model's store is scored (`encode`), and the comparison table and plot become
artifacts. Re-running skips finished models (the sweep's record).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from neuropredictor_flows.artifacts import artifact_key, markdown_image
from neuropredictor_flows.distributed import Launches, check_deployment, child_key, watch
from neuropredictor_flows.extract import (
    ExtractParameters,
    emit,
    extract_flow,
    no_credentials,
    parameter_storage_options,
    resolve_credentials,
)
from neuropredictor_flows.paths import refuse_relative_paths
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from pydantic import Field, field_validator

from neuropredictor.config import ExtractConfig
from neuropredictor.redact import redact_text
from neuropredictor.store import FeatureStore
from neuropredictor.sweep import SweepConfig, SweepModel
from neuropredictor.sweep import run as sweep_run


class SweepParameters(SweepConfig):
    """A sweep: the stimuli, the models, their layers, and the neural data to compare them on."""

    deployment: str | None = Field(None, description="Run each model as a child run of this extract deployment "
                                   "(e.g. extract/gpu: a pod per model, in parallel); default: one after another "
                                   "in this flow run, on this worker's devices.")
    credentials_block: str | None = Field(None, description="Prefect Secret block holding the storage options "
                                          "(JSON: endpoint_url, key, secret) for s3:// URLs; never logged.")
    storage_options: dict[str, Any] | None = parameter_storage_options()
    poll_seconds: float = Field(10.0, gt=0, description="How often the parent checks its child runs (one request "
                                "per 200 of them).")
    timeout_hours: float = Field(72.0, gt=0, description="The parent gives up waiting for children after this long.")
    max_in_flight: int = Field(16, ge=1, description="With a deployment: child runs queued or running at once "
                               "(about the number of GPU machines); the other models wait in the parent.")

    _no_credentials = field_validator("storage_options")(no_credentials)

    def library_config(self) -> SweepConfig:
        fields = self.model_dump(include=set(SweepConfig.model_fields))
        fields["storage_options"] = resolve_credentials(self.storage_options, self.credentials_block)
        return SweepConfig(**fields)


@task(name="encode-model", task_run_name="{model.label}", cache_policy=NO_CACHE)
def encode_task(sweep: SweepConfig, model: SweepModel, record: sweep_run.SweepRecord) -> dict:
    return sweep_run.encode_model(sweep, model, record)


@task(name="compare", cache_policy=NO_CACHE)
def compare_task(sweep: SweepConfig, models: list[SweepModel]) -> dict:
    return sweep_run.compare_models(sweep, models)


def _child(params: SweepParameters, config: ExtractConfig) -> ExtractParameters:
    """One model's extract parameters as the user gave them: credentials by block, never by value (they
    are a run's parameters, kept in Prefect's database)."""
    return ExtractParameters(**config.model_dump(exclude={"storage_options"}), storage_options=params.storage_options,
                             credentials_block=params.credentials_block)


def _extract_subflow(params: SweepParameters) -> sweep_run.Extractor:
    """Each model as an `extract` subflow run of this flow run; its events reach the terminal's progress
    (when there is one) through `emit`."""
    def extract(config: ExtractConfig, on_event: sweep_run.ProgressFn | None) -> dict:
        # a failed or cancelled extraction raises here: that model is recorded as failed, the others run
        extract_flow(_child(params, config), return_state=True).result()
        return FeatureStore.open(config.out, config.storage_options, mode="r").manifest

    return extract


def _extract_children(params: SweepParameters, sweep: SweepConfig, record: sweep_run.SweepRecord,
                      model_done: Callable[[], None]) -> dict[str, dict]:
    results = {}
    todo = []
    for model in sweep.models:
        if sweep_run.is_extracted(sweep, model, record):
            results[model.label] = sweep_run.skipped(record, model)
            model_done()
        else:
            todo.append(model)
    # at most max_in_flight children at once (not a pod per model pending until it is called Crashed)
    window = Launches(len(todo), params.max_in_flight, max_relaunches=0, give_up=False)

    def launch(i: int) -> None:
        child = _child(params, sweep.extract_config(todo[i]))
        run = run_deployment(name=params.deployment, parameters={"params": child.model_dump(mode="json")}, timeout=0,
                             as_subflow=True, flow_run_name=todo[i].label, idempotency_key=child_key(todo[i].label))
        window.running[i] = run.id

    deadline = time.monotonic() + params.timeout_hours * 3600
    with get_client(sync_client=True) as client, contextlib.closing(
            watch(window, launch, client, params.poll_seconds, deadline, "extract-sweep")) as polls:
        for ended, _states in polls:
            for i, state in ended:
                model, run_id = todo[i], window.running[i]
                kind, message = ("DELETED", None) if state is None else (state.type.value, state.message)
                window.ended(i, kind, message, committed=False)
                if kind == "COMPLETED":
                    manifest = FeatureStore.open(sweep.store_url(model), sweep.storage_options, mode="r").manifest
                    child = client.read_flow_run(run_id)  # its own time, not the sweep's
                    results[model.label] = sweep_run.record_extracted(
                        sweep, model, record, manifest, child.total_run_time.total_seconds(), child.start_time)
                else:
                    results[model.label] = sweep_run.record_failed(sweep, model, record, f"{kind}: {message}")
                model_done()
    for i in [*window.running, *window.todo]:
        results[todo[i].label] = sweep_run.record_failed(sweep, todo[i], record, "not finished when the parent ended "
                                                         f"(after {params.timeout_hours} h, or on an error)")
    return results


@flow(name="extract-sweep", validate_parameters=True)
def extract_sweep_flow(params: SweepParameters) -> dict:
    """Extract every model of a sweep into its own store, score them on the neural data, compare them."""
    logger = get_run_logger()
    sweep = params.library_config()
    refuse_relative_paths(*(sweep.extract_config(m) for m in sweep.models),
                          *(sweep.encode_options(m) for m in sweep.models if sweep.neural is not None))
    progress = create_progress_artifact(progress=0.0, key=artifact_key("sweep-progress", sweep.out),
                                        description=f"Models of the sweep in {redact_text(sweep.out)} done (with a "
                                                    "deployment: extracted)")
    done = [0]

    def model_done() -> None:
        done[0] += 1
        update_progress_artifact(progress, progress=100.0 * done[0] / len(sweep.models))

    def on_event(event: str, data: dict) -> None:
        emit(event, data)
        if event == "model-done":
            model_done()

    if params.deployment:
        with get_client(sync_client=True) as client:
            check_deployment(client, params.deployment)
        sweep_run.check_neural(sweep)
        record = sweep_run.SweepRecord(sweep)
        extracted = _extract_children(params, sweep, record, model_done)
        summary = sweep_run.summarize(sweep, [sweep_run.model_entry(sweep, m, record, extracted[m.label], encode_task)
                                              for m in sweep.models], compare_task)
    else:
        summary = sweep_run.run_sweep(sweep, on_event, extract=_extract_subflow(params), encode=encode_task,
                                      compare=compare_task)
    _artifacts(sweep, summary)
    logger.info("%d models done, %d failed", len(summary["models"]) - len(summary["failed"]), len(summary["failed"]))
    if summary["failed"]:
        raise sweep_run.SweepFailed(summary)
    return summary


def _artifacts(sweep: SweepConfig, summary: dict) -> None:
    create_table_artifact(
        key=artifact_key("sweep-models", sweep.out),
        table=[{"model": e["model"], "status": e["status"], "layers": len(e["extract"].get("layers", [])),
                "rows": e["extract"].get("rows", {}).get("committed"), "images/s": e["extract"].get("images_per_s"),
                "store": e["store"], "error": e["extract"].get("error") or e.get("encode", {}).get("error")}
               for e in summary["models"]],
        description=f"Models of the sweep in {redact_text(sweep.out)}")
    comparison = summary.get("comparison")
    if comparison:
        rows = [{"roi": roi, "rank": i + 1, **entry} for roi, entries in comparison["ranking"].items()
                for i, entry in enumerate(entries)]
        create_table_artifact(key=artifact_key("sweep-ranking", sweep.out), table=rows,
                              description="Models ranked by their best layer, per ROI")
        create_markdown_artifact(key=artifact_key("sweep-comparison", sweep.out), markdown=(
            f"# Sweep comparison\n\n- **Table**: `{comparison['csv']}`\n- **Plot**: `{comparison['plot']}`\n\n"
            + (f"**Warning**: {comparison['warning']}\n\n" if comparison.get("warning") else "")
            + markdown_image(comparison["plot"], "comparison", sweep.storage_options)),
            description="Models compared on the neural data")
