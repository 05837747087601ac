"""The distributed parent reads its children's states in pages (one request per 200 runs per poll), not one
request per child: against a real Prefect server, 250 child runs take two requests and every state is right."""

from __future__ import annotations

from neuropredictor_flows.distributed import POLL_PAGE, child_states
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Completed, Running


@flow(name="scale-polling-child")
def _child() -> None:
    pass


class _Counted:
    """The real client, with its calls of read_flow_runs counted."""

    def __init__(self, client) -> None:
        self.client, self.calls = client, 0

    def read_flow_runs(self, **kw):
        self.calls += 1
        return self.client.read_flow_runs(**kw)


def test_child_states_are_read_in_pages(prefect_api):
    n = POLL_PAGE + 50
    with get_client(sync_client=True) as client:
        runs = [client.create_flow_run(_child, state=Running()) for _ in range(n)]
        done = {run.id for run in runs[::7]}
        for run_id in done:
            client.set_flow_run_state(run_id, Completed(), force=True)
        counted = _Counted(client)
        states = child_states(counted, [run.id for run in runs])
    assert counted.calls == 2
    assert set(states) == {run.id for run in runs}
    assert {i for i, s in states.items() if s.type.value == "COMPLETED"} == done
