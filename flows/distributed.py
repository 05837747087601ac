"""The `extract-distributed` flow: one store, many machines.

The parent validates and plans the store once, splits the missing shards into groups, and launches one
child run of an `extract` deployment per group (`run_deployment`), so each GPU worker machine takes a
group and uses all of its GPUs. It waits for the children, re-launches failed groups up to a limit, and
finalizes the manifest once. The store's commit records make the children independent: a child that
dies is simply run again, and re-running the parent resumes.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

from neuropredictor_flows.artifacts import artifact_key
from neuropredictor_flows.extract import (
    ExtractParameters,
    finalize_task,
    plan_task,
    report_artifacts,
    summarize,
    validate_task,
)
from neuropredictor_flows.paths import refuse_relative_paths
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import State
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Cancelling
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
    max_in_flight: int = Field(16, ge=1, description="Child runs queued or running at once (about the number "
                               "of GPU machines): the others wait in the parent, not as pods that time out "
                               "pending and are relaunched while they still start later.")
    poll_seconds: float = Field(10.0, gt=0, description="How often the parent checks its children.")
    timeout_hours: float = Field(72.0, gt=0, description="The parent gives up waiting after this long.")


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED", "DELETED"}
_SAY_EVERY_S = 300.0  # how often the parent logs where its children are
# Child runs per `read_flow_runs` request: a Prefect server answers at most its default limit (200) per
# request. The parent's load on the server is one request per POLL_PAGE running children per poll, not
# one per child (600 children polled every 10 s: 0.3 requests/s instead of 60).
POLL_PAGE = 200
PARENT_LEASE = "waiting for its child runs"  # what the parent's lease on the store says it does


def child_key(name: str) -> str:
    """The idempotency key of a child run: one child per name and run of this flow. A retried flow run
    keeps its id, so the key holds its run count: otherwise the server hands back the old children."""
    return f"{flow_run.id}-run{flow_run.run_count}-{name}"


class Launches:
    """Which groups the parent launches, and when: at most `max_in_flight` children at once; a group whose
    child ended otherwise than Completed is launched again (first in line, up to `max_relaunches` times)
    unless its shards are committed or it was cancelled; and, as the shard loop does (`DeviceWindow`), when
    the first GIVE_UP_AFTER children all fail with none completed, nothing more is launched once those
    running end (the cause is then the deployment, the model or the storage: each launch would fail too)."""

    def __init__(self, groups: int, max_in_flight: int, max_relaunches: int, give_up: bool = True) -> None:
        self.todo = deque(range(groups))
        self.running: dict[int, UUID] = {}
        self.attempts = [0] * groups
        self.failed: dict[int, str] = {}
        self.finished = 0  # groups whose children are over, for good
        self._max_in_flight, self._max_relaunches = max_in_flight, max_relaunches
        # (a sweep's children are models: each fails or not on its own)
        self._first = schedule.FirstFailures(enabled=give_up)
        self._errors: dict[int, str] = {}  # the last error of each group that failed

    def to_launch(self) -> list[int]:
        if self._first.tripped and self.todo:
            if self.running:
                return []  # a child still running may complete: wait for it
            why = self._first.reason("child runs")
            self.failed.update({i: self._errors.get(i, why) for i in self.todo})
            self.finished += len(self.todo)
            self.todo.clear()
        out = []
        while self.todo and len(self.running) + len(out) < self._max_in_flight:
            out.append(self.todo.popleft())
        for i in out:
            self.attempts[i] += 1
        return out

    def ended(self, i: int, state: str, message: str | None, committed: bool) -> bool:
        """A child of group i ended in `state`; returns whether the group is launched again."""
        del self.running[i]
        if state == "COMPLETED" or committed:  # a crashed pod may have committed everything first
            self._first.note(None)
            self.finished += 1
            return False
        self._errors[i] = f"{state}: {message}"
        self._first.note(self._errors[i])
        if state != "CANCELLED" and self.attempts[i] <= self._max_relaunches:
            self.todo.appendleft(i)
            return True
        self.failed[i] = self._errors[i] + (" (cancelled: not launched again)" if state == "CANCELLED" else "")
        self.finished += 1
        return False


def watch(window: Launches, launch: Callable[[int], None], client: Any, poll_seconds: float, deadline: float,
          parent: str) -> Iterator[tuple[list[tuple[int, State | None]], dict[UUID, State | None]]]:
    """Launch what `window` allows, then poll the children: yields, per poll, the (group, state) of the
    children that ended (a child deleted from the server: state None), for the caller to pass to
    `window.ended`, and every running child's state. When the loop ends (nothing running, the deadline, an
    error: use it under `contextlib.closing`) the children still running are cancelled: they do not run on
    without their parent."""
    try:
        for i in window.to_launch():
            launch(i)
        while window.running and time.monotonic() < deadline:
            time.sleep(poll_seconds)
            states = child_states(client, list(window.running.values()))
            yield [(i, states.get(run_id)) for i, run_id in list(window.running.items())
                   if states.get(run_id) is None or states[run_id].type.value in TERMINAL], states
            for i in window.to_launch():
                launch(i)
    finally:
        for run_id in window.running.values():
            with contextlib.suppress(Exception):
                client.set_flow_run_state(run_id, Cancelling(message=f"its {parent} parent ended"), force=True)


def check_deployment(client: Any, name: str) -> None:
    """NeuroPredictorError, before any work, when the deployment the children would run does not exist: named
    with the deployments there are (closest first). Otherwise a mistyped name fails only at the first launch,
    after the parent has loaded the model and planned the store."""
    with contextlib.suppress(ObjectNotFound, ValueError):
        if name.count("/") == 1:
            client.read_deployment_by_name(name)
        else:  # run_deployment takes a deployment's id too
            client.read_deployment(UUID(name))
        return
    flows = {f.id: f.name for f in client.read_flows()}
    known = sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    raise NeuroPredictorError(
        f"no deployment {name!r} on this Prefect server (deployment names are FLOW/DEPLOYMENT, e.g. extract/gpu)"
        + (f"; did you mean {', '.join(close)}?" if close else f"; it has {', '.join(known) or 'none'}")
        + " Deploy it first (`prefect deploy`, see deployments/), or pass deployment=NAME.")


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
    with get_client(sync_client=True) as client:
        check_deployment(client, params.deployment)
    # the parent plans and finalizes on its control worker, which need not have the children's GPUs
    config = params.library_config().model_copy(update={"device": "cpu"})
    refuse_relative_paths(config)
    shards = validate_task(config)
    planned = plan_task(config, shards)
    store = FeatureStore.open(config.out, config.storage_options, generation=planned["generation"])
    groups = [[s.name for s in g]
              for g in schedule.pending_groups(store, shards, params.shards, params.shards_per_child, planned)]
    logger.info("%d shards to extract in %d child runs of %s", sum(map(len, groups)), len(groups), params.deployment)
    progress = create_progress_artifact(progress=0.0 if groups else 100.0,
                                        key=artifact_key("extract-distributed-progress", config.out),
                                        description=f"Child runs of {params.deployment} finished")
    child_fields = set(ExtractParameters.model_fields)
    base = params.model_dump(mode="json", include=child_fields)
    window = Launches(len(groups), params.max_in_flight, params.max_relaunches)

    def launch(i: int) -> None:
        # the parent's plan already verified and replaced: children only extract their shards
        child = dict(base, shards=groups[i], finalize=False, verify=False, overwrite=False)
        run = run_deployment(
            name=params.deployment, parameters={"params": child}, timeout=0, as_subflow=True,
            idempotency_key=child_key(f"group{i}-attempt{window.attempts[i]}"),
            flow_run_name=schedule.group_label(groups[i]),
        )
        window.running[i] = run.id

    deadline = time.monotonic() + params.timeout_hours * 3600
    said = time.monotonic()
    # the parent's own lease on the store while children are queued, run and are relaunched (between
    # them no child holds one): replacing the store is refused meanwhile
    with store.session(PARENT_LEASE), get_client(sync_client=True) as client, contextlib.closing(
            watch(window, launch, client, params.poll_seconds, deadline, "extract-distributed")) as polls:
        for ended, states in polls:
            for i, state in ended:
                kind, message = ("DELETED", None) if state is None else (state.type.value, state.message)
                committed = kind != "COMPLETED" and len(store.committed(groups[i])) == len(groups[i])
                if window.ended(i, kind, message, committed):
                    logger.warning("child run for %s ended %s (%s); launching it again", groups[i][0], kind, message)
            if ended:
                update_progress_artifact(progress, progress=100.0 * window.finished / max(len(groups), 1))
            if time.monotonic() - said > _SAY_EVERY_S:  # a pool without a worker shows as children waiting
                said = time.monotonic()
                waiting = Counter(s.type.value if s else "DELETED" for s in states.values())
                logger.info("%d of %d groups done; children now: %s", window.finished, len(groups),
                            ", ".join(f"{n} {k.lower()}" for k, n in sorted(waiting.items())))
    for i in window.running:  # cancelled by `watch`: the deadline, or an error
        window.failed[i] = f"still running when the parent ended (after {params.timeout_hours} h): cancelled"
    for i in window.todo:
        window.failed.setdefault(i, "not launched before the parent ended")
    reasons = {name: window.failed[i] for i, g in enumerate(groups) if i in window.failed for name in g}
    if not params.finalize:  # judged by the store's commit records too
        committed = store.committed()  # one listing, concurrent reads
        missing = {name: reasons.get(name, "not committed") for g in groups for name in g if name not in committed}
        if missing:
            raise NeuroPredictorError(schedule.failure_message(missing))
        return {"status": "shards-done", "shards": {name: "committed" for g in groups for name in g}}
    manifest = finalize_task(config, planned["generation"])
    report_artifacts(config, manifest)
    # judged by what the store holds, not by the children's states: a child that ended Completed
    # without committing its shards leaves them unfinished; the children's reasons where they have one
    scope = set(params.shards) if params.shards else None
    missing = {k: reasons.get(k, v) if v == "not committed" else v for k, v in schedule.unfinished(manifest).items()
               if scope is None or k in scope}
    if missing:
        raise NeuroPredictorError(schedule.failure_message(missing))
    return summarize(manifest)
