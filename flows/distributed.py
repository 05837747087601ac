"""The `extract-distributed` flow: one store, many machines.

The parent validates and plans the store once, splits the missing shards into groups, and launches one
child run of an `extract` deployment per group (`run_deployment`), so each GPU worker machine takes a
group and uses all of its GPUs. It waits for the children, re-launches failed groups up to a limit, and
finalizes the manifest once. The store's commit records make the children independent: a child that
dies is simply run again, and re-running the parent resumes.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from neuropredictor_flows.extract import (
    ExtractParameters,
    finalize_task,
    plan_task,
    report_artifacts,
    summarize,
    validate_task,
)
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import State
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from pydantic import Field

from neuropredictor import schedule
from neuropredictor.errors import NeuroPredictorError
from neuropredictor.store import FeatureStore


class DistributedParameters(ExtractParameters):
    """An extraction spread over the workers of a work pool, one child flow run per group of shards."""

    deployment: str = Field("extract/gpu", description="The extract deployment that runs each group "
                            "(its work pool decides where: e.g. a Kubernetes GPU pool).")
    shards_per_child: int = Field(16, ge=1, description="Shards per child run (one machine's share at a time).")
    max_relaunches: int = Field(2, ge=0, description="How often a failed group is launched again.")
    poll_seconds: float = Field(10.0, gt=0, description="How often the parent checks its children.")
    timeout_hours: float = Field(72.0, gt=0, description="The parent gives up waiting after this long.")


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Child runs per `read_flow_runs` request: a Prefect server answers at most its default limit (200) per
# request. The parent's load on the server is one request per POLL_PAGE running children per poll, not
# one per child (600 children polled every 10 s: 0.3 requests/s instead of 60).
POLL_PAGE = 200
PARENT_LEASE = "waiting for its child runs"  # what the parent's lease on the store says it does


def child_key(name: str) -> str:
    """The idempotency key of a child run: one child per name and run of this flow. A retried flow run
    keeps its id, so the key holds its run count: otherwise the server hands back the old children."""
    return f"{flow_run.id}-run{flow_run.run_count}-{name}"


def child_states(client: Any, run_ids: list[UUID]) -> dict[UUID, State | None]:
    """The current state of each child run, read in pages of POLL_PAGE runs."""
    out: dict[UUID, State | None] = {}
    for i in range(0, len(run_ids), POLL_PAGE):
        page = run_ids[i:i + POLL_PAGE]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page))
        out.update({run.id: run.state for run in runs})
    return out


@flow(name="extract-distributed", validate_parameters=True)
def extract_distributed_flow(params: DistributedParameters) -> dict:
    """Fan an extraction out over a work pool's workers; finalize once when every group is done."""
    logger = get_run_logger()
    # the parent plans and finalizes on its control worker, which need not have the children's GPUs
    config = params.library_config().model_copy(update={"device": "cpu"})
    shards = validate_task(config)
    planned = plan_task(config, shards)
    store = FeatureStore.open(config.out, config.storage_options, generation=planned["generation"])
    groups = [[s.name for s in g]
              for g in schedule.pending_groups(store, shards, params.shards, params.shards_per_child, planned)]
    logger.info("%d shards to extract in %d child runs of %s", sum(map(len, groups)), len(groups), params.deployment)
    progress = create_progress_artifact(progress=0.0 if groups else 100.0, key="extract-distributed-progress",
                                        description=f"Child runs of {params.deployment} finished")
    child_fields = set(ExtractParameters.model_fields)
    base = params.model_dump(mode="json", include=child_fields)
    attempts = [0] * len(groups)
    running: dict[int, UUID] = {}

    def launch(i: int) -> None:
        attempts[i] += 1
        # the parent's plan already verified and replaced: children only extract their shards
        child = dict(base, shards=groups[i], finalize=False, verify=False, overwrite=False)
        run = run_deployment(
            name=params.deployment, parameters={"params": child}, timeout=0, as_subflow=True,
            idempotency_key=child_key(f"group{i}-attempt{attempts[i]}"),
            flow_run_name=groups[i][0] if len(groups[i]) == 1 else f"{groups[i][0]}..{groups[i][-1]}",
        )
        running[i] = run.id

    failed: dict[int, str] = {}
    finished = 0
    deadline = time.monotonic() + params.timeout_hours * 3600
    # the parent's own lease on the store while children are queued, run and are relaunched (between
    # them no child holds one): replacing the store is refused meanwhile
    with store.session(PARENT_LEASE), get_client(sync_client=True) as client:
        for i in range(len(groups)):
            launch(i)
        while running and time.monotonic() < deadline:
            time.sleep(params.poll_seconds)
            states = child_states(client, list(running.values()))
            for i, run_id in list(running.items()):
                state = states.get(run_id)
                if state is None or state.type.value not in TERMINAL:
                    continue
                del running[i]
                if state.type.value == "COMPLETED":
                    finished += 1
                elif attempts[i] <= params.max_relaunches:
                    logger.warning("child run for %s ended %s (%s); launching it again", groups[i][0],
                                   state.type.value, state.message)
                    launch(i)
                else:
                    failed[i] = f"{state.type.value}: {state.message}"
                    finished += 1
            update_progress_artifact(progress, progress=100.0 * finished / max(len(groups), 1))
    for i in running:
        failed[i] = f"still running after {params.timeout_hours} h"
    if not params.finalize:  # judged by the store's commit records too
        committed = store.committed()  # one listing, concurrent reads
        missing = {name: failed.get(i, "not committed") for i, g in enumerate(groups) for name in g
                   if name not in committed}
        if missing:
            raise NeuroPredictorError(schedule.failure_message(missing))
        return {"status": "shards-done", "shards": {name: "committed" for g in groups for name in g}}
    manifest = finalize_task(config, planned["generation"])
    report_artifacts(config, manifest)
    # judged by what the store holds, not by the children's states: a child that ended Completed
    # without committing its shards leaves them unfinished
    scope = set(params.shards) if params.shards else None
    missing = {k: v for k, v in schedule.unfinished(manifest).items() if scope is None or k in scope}
    if missing:
        raise NeuroPredictorError(schedule.failure_message(missing))
    return summarize(manifest)
