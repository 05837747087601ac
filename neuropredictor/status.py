"""The status words of a store, of its shards and of a sweep's steps, in one place (they are written to
manifest.json and sweep.json and shown by the CLI and the Prefect artifacts as they are)."""

from __future__ import annotations

from enum import StrEnum


class StoreStatus(StrEnum):
    PLANNING = "planning"  # manifest written, arrays being created (an interrupted plan is redone)
    PLANNED = "planned"  # arrays exist; shards are being extracted (or the run was interrupted)
    COMPLETE = "complete"  # finalized, every shard committed
    PARTIAL = "partial"  # finalized, some shards failed or pending

    @property
    def finalized(self) -> bool:
        return self in (StoreStatus.COMPLETE, StoreStatus.PARTIAL)


class ShardStatus(StrEnum):
    COMMITTED = "committed"  # its commit record exists: its rows are complete and trusted
    FAILED = "failed"  # its last attempt failed (a failure record); re-run to retry it
    PENDING = "pending"  # not extracted yet


class StepStatus(StrEnum):
    """How a sweep's step (a model's extraction or scoring) ended, in sweep.json and its summary."""

    DONE = "done"
    FAILED = "failed"


FAILURES_SHOWN = 20  # failed shards a message or summary names one by one (the manifest names them all)
