"""The shard loop, in one place: which shards are left, one group of shards in flight per device, retries,
and what a failed shard leaves behind.

    run(config)                         plan -> every pending shard on every device -> finalize, here
    finalize(config, store)             merge the commit records into manifest.json, with the shards'
                                        retries; one clear error if it still fails
    pending_groups(store, shards, ...)  the shards without a commit record, in groups
    extract_group(config, group, ...)   one group on one device; a failure is recorded, then raised
    DeviceWindow                        which group starts next on which free device
    RetryPolicy                         how often and after how long a failed group runs again

`run` executes groups on threads (one per device); the Prefect flows execute the same groups as tasks
(`flows/extract.py`), with the same window, the same retry delays and the same failure records, so a
run with or without a Prefect server resumes the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from neuropredictor.config import ExtractConfig
from neuropredictor.errors import ConfigMismatchError, Interrupted, NeuroPredictorError, StoreError
from neuropredictor.pipeline import extract_shard, plan, validate
from neuropredictor.pipeline.readahead import Readahead
from neuropredictor.redact import redact_text
from neuropredictor.shard import Shard
from neuropredictor.status import FAILURES_SHOWN, ShardStatus
from neuropredictor.store import FeatureStore, ShardBusy
from neuropredictor.store.locks import process_id

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, dict], None]
"""on_event(event, data): "planned" {rows, committed_rows, shards, committed_shards},
"batch" {images} (negative: a failed attempt's images taken back, as they run again), "shard" {name, record}
(record["skipped"]: another run extracted it meanwhile; its images came in no "batch" event)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a failed group of shards: `retries` more attempts, the first after `delay_s`, each next
    one after twice as long, every delay stretched by up to `jitter` (so many workers do not retry in step)."""

    retries: int = 2
    delay_s: float = 10.0
    jitter: float = 0.5

    @classmethod
    def of(cls, config: ExtractConfig) -> RetryPolicy:
        return cls(retries=config.retries, delay_s=config.retry_delay_seconds)

    def delays(self) -> list[float]:
        """The delay before each retry, each stretched by a share of up to `jitter` drawn now (also for
        Prefect's `retry_delay_seconds`: its task engine leaves its own retry_jitter_factor unused)."""
        return [self.delay_s * 2**i * (1 + self.jitter * random.random()) for i in range(max(self.retries, 1))]

    def call(self, fn: Callable[[int], Any], stop: threading.Event | None = None,
             fatal: tuple[type[BaseException], ...] = ()) -> Any:
        """fn(attempt) for attempt 1, 2, ... until it returns or the retries are spent (then it raises);
        an exception of a `fatal` type is raised at once."""
        delays, stop = self.delays(), stop or threading.Event()  # an event never set: its wait is a sleep
        for attempt in range(1, self.retries + 2):
            try:
                return fn(attempt)
            except Exception as exc:
                if isinstance(exc, fatal) or attempt > self.retries or stop.is_set():
                    raise
            if stop.wait(delays[attempt - 1]):
                raise Interrupted("stopped while waiting to retry")
        raise AssertionError("unreachable")  # pragma: no cover


def committed_names(store: FeatureStore, planned: dict | None = None) -> Collection[str]:
    """The shards committed as the plan found them: from `planned` (what `plan` returned where it ran in
    another task or process) or the store's own plan; read now (one listing) for a store that was opened."""
    if planned is not None and "committed" in planned:
        return set(planned["committed"])  # a list, once it has passed through a task's result
    if store.committed_at_plan is not None:
        return store.committed_at_plan
    return store.committed().keys()


def pending_groups(store: FeatureStore, shards: Sequence[Shard], names: Sequence[str] | None = None,
                   per_group: int = 1, planned: dict | None = None, shared: bool = False) -> list[list[Shard]]:
    """The corpus's `shards` (as `validate` listed them now, matching the plan) without a commit record
    (only `names`, if given), in order, in groups of `per_group`; committed as `committed_names` tells.
    The shards are read where the corpus is now: the plan's URLs are a record (with credentials redacted,
    and from where the corpus was then), never read from. `shared` (other runs extract into the store now,
    `FeatureStore.shared`): in a random order instead, so that runs of one command share the shards, each
    rarely reaching one that another extracts (it would wait for it)."""
    if names is not None:
        unknown = sorted(set(names) - {s.name for s in shards})
        if unknown:
            raise NeuroPredictorError(f"shards {unknown[:5]} are not in the corpus of the store {store.url}")
        wanted = set(names)
        shards = [s for s in shards if s.name in wanted]
    done = committed_names(store, planned)
    # shards that failed in an earlier run go last: a few bad shards at the front would otherwise end
    # every rerun early (`DeviceWindow`), and the others' rows come first
    failed_before = {e["name"] for e in store.manifest.get("shards", []) if e.get("status") == ShardStatus.FAILED}
    todo = [s for s in shards if s.name not in done]
    if shared:  # not the global generator: jobs that seed it alike would all take one order
        random.SystemRandom().shuffle(todo)
    todo.sort(key=lambda s: s.name in failed_before)
    return [todo[i:i + per_group] for i in range(0, len(todo), per_group)]


def group_label(group: Sequence[Shard] | Sequence[str]) -> str:
    """A group of shards (or of their names) as it is named in logs and the UI: its first shard and how many more
    (not first..last: a group of a resumed or shared run has gaps, which a range would hide)."""
    names = [s if isinstance(s, str) else s.name for s in group]
    return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"


BUSY_POLL_S = 5.0  # how often a shard another run extracts is looked at again
BUSY_WAIT_S = 12 * 3600.0  # how long for, at most (a run whose rows advance is waited for; see locks.stuck)


def extract_group(config: ExtractConfig, group: Iterable[Shard], store: FeatureStore, device: str | None = None,
                  attempt: int = 1, on_batch: Callable[[int], None] | None = None,
                  stop: threading.Event | None = None, wait_busy: bool = True,
                  readahead: Readahead | None = None) -> list[dict]:
    """Extract each shard of the group on `device` (committed ones are skipped). A shard that fails gets a
    failure record naming the attempt, and the error is raised, so that the caller retries the group; the
    images it reported to on_batch are taken back (on_batch(-n)): they are extracted again.

    A shard that another run is extracting now (`ShardBusy`) waits until the group's others are done; it is
    then skipped once that run commits it, or extracted here if that run gives it up (it failed, or died and
    its claim expired, or is stuck: `locks.stuck`). Skipped shards' records say `skipped`. With
    `wait_busy=False` it is not waited for: its record says `busy` (the caller comes back to it).
    `readahead`: each shard's reader is started as the one before it ends (`pipeline.readahead`)."""
    records, busy = [], []
    group = list(group)
    for i, shard in enumerate(group):
        # not while a busy shard is left to wait for (up to BUSY_WAIT_S): the next group's reader would idle
        then = None if readahead is None else functools.partial(_next_unless_waiting, readahead, group, i,
                                                                str(device or ""), busy if wait_busy else [])
        try:
            records.append(_extract_recorded(config, shard, store, device, attempt, on_batch, stop, readahead, then))
        except ShardBusy as exc:
            if wait_busy:  # (the caller says so otherwise, once)
                log.info("%s; it waits until the others are done", exc)
            busy.append((shard, exc))
    if not wait_busy:
        return records + [{"shard": shard.name, "busy": str(exc)} for shard, exc in busy]
    stop = stop or threading.Event()  # never set: its wait is a sleep
    for shard, error in busy:
        for _ in range(int(BUSY_WAIT_S / BUSY_POLL_S)):
            if stop.wait(BUSY_POLL_S):
                raise Interrupted(f"stopped while waiting for shard {shard.name}, which another run extracts")
            try:
                records.append(_extract_recorded(config, shard, store, device, attempt, on_batch, stop))
                break
            except ShardBusy as exc:
                error = exc
        else:
            store.record_failure(shard, _held_too_long(str(error)), attempts=attempt)
            raise error
    return records


def _next_unless_waiting(readahead: Readahead, group: list[Shard], index: int, device: str,
                         busy: list) -> Shard | None:
    return None if busy and index + 1 >= len(group) else readahead.after(group, index, device)


def _held_too_long(why: str) -> str:
    return f"{why} for over {BUSY_WAIT_S / 3600:.0f} h"


def _extract_recorded(config: ExtractConfig, shard: Shard, store: FeatureStore, device: str | None, attempt: int,
                      on_batch: Callable[[int], None] | None, stop: threading.Event | None,
                      readahead: Readahead | None = None, then: Callable[[], Shard | None] | None = None) -> dict:
    """extract_shard, with a failure record for a shard that fails (see extract_group)."""
    counted = [0]

    def count(n: int) -> None:
        counted[0] += n
        if on_batch is not None:
            on_batch(n)

    try:
        record = extract_shard(config, shard, store=store, device=device, on_batch=count, attempt=attempt, stop=stop,
                               readahead=readahead, then=then)
    except (Interrupted, ShardBusy):
        raise  # not a failure of the shard: it runs again next time, or another run extracts it
    except Exception as exc:
        if on_batch is not None and counted[0]:
            on_batch(-counted[0])
        try:
            store.record_failure(shard, f"{type(exc).__name__}: {exc}", attempts=attempt)
        except Exception as unrecorded:  # the storage is down, most often: the shard's own error is the news
            log.warning("%s: its failure could not be recorded in the store (%s: %s)", shard.name,
                        type(unrecorded).__name__, redact_text(str(unrecorded))[:300])
        raise
    return record | {"shard": shard.name}


def storage_outage(store: FeatureStore, group: Sequence[Shard], storage_options: Mapping | None = None) -> str | None:
    """Why the storage a failed group needs cannot be reached now (the output store, or the group's first shard),
    or None. Asked once the group's retries are spent: then the other groups would fail alike, each after its own
    retries (an outage in the middle of 1,000 shards cost each of them a minute or more of retries)."""
    from neuropredictor import fs as fsx
    from neuropredictor.corpus.access import connect

    why = store.unreachable()
    if why is not None or not group:
        return why
    try:
        fs, path = connect(group[0].url, storage_options, fresh=False)
        fs.info(path)
    except FileNotFoundError:
        return None  # the shard's own problem
    except Exception as exc:
        return fsx.outage(group[0].url, exc, "the corpus")
    return None


def done_elsewhere(record: dict) -> bool:
    """Whether a shard's record, as extract_group returns it, is of a shard another process committed
    during this run (its rows were not counted by this run's progress)."""
    ours = record.get("process") == process_id() if "process" in record else (
        (record.get("host"), record.get("pid")) == (socket.gethostname(), os.getpid()))  # older records
    return bool(record.get("skipped")) and not ours


def news(record: dict) -> bool:
    """Whether a shard's record, as extract_group returns it, is progress to report (a "shard" event): a shard
    extracted here, or by another run meanwhile; not one this run committed before, nor one still busy."""
    return not record.get("busy") and (not record.get("skipped") or done_elsewhere(record))


GIVE_UP_AFTER = 3  # groups failed after their retries, one after another, before any succeeded
NOT_STARTED = "not started"  # how the groups left after those read in `failed`


class FirstFailures:
    """The give-up rule, one home for the shard loop and the distributed parent: when the first
    GIVE_UP_AFTER pieces of work all fail and none succeeds, the cause is the model, its options, the
    deployment or the storage, not the work, and nothing more should start."""

    def __init__(self, enabled: bool = True) -> None:
        self._succeeded = not enabled
        self._errors: list[str] = []

    def note(self, error: str | None) -> None:
        if error is None:
            self._succeeded = True
        elif not self._succeeded:
            self._errors.append(error)

    @property
    def tripped(self) -> bool:
        return not self._succeeded and len(self._errors) >= GIVE_UP_AFTER

    def reason(self, what: str) -> str:
        return f"{NOT_STARTED}: the first {len(self._errors)} {what} all failed (last: {self._errors[-1][:200]})"


class DeviceWindow:
    """One group of shards in flight per device: `start` pairs free devices with the next groups, `finish`
    frees a device and keeps what a finished group leaves (its uncommitted shards, if it failed; its busy
    shards, which another run extracts, come back BUSY_POLL_S later, behind the groups waiting then).

    When the first GIVE_UP_AFTER groups all fail, no other group starts: the cause is then the model, its
    options or the storage, not a shard, and each further group would spend its retries on it (a model
    that runs out of memory on every batch held a sweep for hours). The groups not started count as failed,
    with that reason; they run on the next run. So it is when a group fails whole and `probe(group)` (see
    `storage_outage`) says the storage it needs cannot be reached, however many groups succeeded before."""

    def __init__(self, groups: Iterable[Sequence[Shard]], devices: Sequence[str],
                 probe: Callable[[Sequence[Shard]], str | None] | None = None) -> None:
        self._lock = threading.Lock()  # `upcoming` is asked from the devices' threads
        self._promised: dict[str, list[Shard]] = {}  # device -> the group `upcoming` said it would get
        self._todo = deque(list(g) for g in groups)
        self._devices = len(devices)
        self._free = list(devices)
        self._later: list[tuple[float, list[Shard]]] = []  # (when, busy shards) to look at again
        self._busy_since: dict[str, float] = {}  # busy shard -> when this run first found it so
        self._why_busy: dict[str, str] = {}  # busy shard -> who holds it, as last found
        self.failed: dict[str, str] = {}  # shard name -> error
        self.rows_done = 0
        self._first = FirstFailures()
        self._probe = probe
        self._outage: str | None = None  # why the storage cannot be reached, once a failed group's probe said so

    def start(self) -> list[tuple[list[Shard], str]]:
        with self._lock:  # `upcoming` reads the groups from the devices' threads
            now = time.monotonic()
            self._todo.extend(group for when, group in self._later if when <= now)
            self._later = [(when, group) for when, group in self._later if when > now]
            if self._outage is not None and (self._todo or self._later):
                why = f"{NOT_STARTED}: {self._outage}"
                self.failed.update({s.name: why for group in self._todo for s in group})
                self.failed.update({s.name: why for _when, group in self._later for s in group})
                self._todo.clear()
                self._later.clear()
            if self._first.tripped and self._todo:
                if len(self._free) < self._devices:
                    return []  # a group still running (on another device) may succeed: wait for it
                why = self._first.reason("groups of shards")
                self.failed.update({s.name: why for group in self._todo for s in group})
                self.failed.update({s.name: why for _when, group in self._later for s in group})
                self._todo.clear()
                self._later.clear()
            out = []
            while self._free and self._todo:
                device = self._free.pop(0)
                # the group promised to this device (its reader may be started already), else one promised
                # to no device, else any (a free device is not kept waiting)
                promised = self._promised.pop(device, None)
                others = [id(g) for g in self._promised.values()]
                group = next((g for g in self._todo if g is promised), None) or \
                    next((g for g in self._todo if id(g) not in others), self._todo[0])
                del self._todo[next(i for i, g in enumerate(self._todo) if g is group)]
                out.append((group, device))
            return out

    def upcoming(self, device: str) -> Shard | None:
        """The first shard of the group `device` gets next (a promise `start` keeps if it still can), for its
        reader to start while the device's current group ends (`pipeline.readahead`)."""
        with self._lock:
            group = self._promised.get(device)
            if group is None or not any(g is group for g in self._todo):
                taken = [id(g) for d, g in self._promised.items() if d != device]
                group = next((g for g in self._todo if id(g) not in taken), None)
                if group is None:
                    self._promised.pop(device, None)
                    return None
                self._promised[device] = group
            return group[0]

    def waiting_s(self) -> float | None:
        """Seconds until a busy shard is looked at again; None when none waits."""
        return max(0.0, min(when for when, _ in self._later) - time.monotonic()) if self._later else None

    def waiting_for(self) -> dict[str, str]:
        """The shards this run waits for (another run extracts them): name -> who holds it, as last found."""
        return {s.name: self._why_busy.get(s.name, s.name) for _when, group in self._later for s in group}

    def finish(self, group: Sequence[Shard], device: str, error: str | None,
               is_committed: Callable[[str], bool], busy: Mapping[str, str] | None = None,
               elsewhere: Collection[str] = ()) -> None:
        """`busy`: shard -> why, of those another run extracts now (looked at again later, for BUSY_WAIT_S at
        most); `elsewhere`: those another run committed meanwhile (they say nothing of whether the model
        works here)."""
        self._free.append(device)
        busy = busy or {}
        left = [s.name for s in group if not _committed(is_committed, s.name)] if error is not None else []
        self.failed.update({name: error for name in left})
        now, later = time.monotonic(), []
        for s in group:
            if s.name in busy and s.name not in self.failed:
                if s.name not in self._busy_since:
                    log.info("%s; this run comes back to it", busy[s.name])
                self._why_busy[s.name] = busy[s.name]
                since = self._busy_since.setdefault(s.name, now)
                if now - since > BUSY_WAIT_S:
                    self.failed[s.name] = _held_too_long(busy[s.name])
                else:
                    later.append(s)
        if later:
            self._later.append((now + BUSY_POLL_S, later))
        ours = [s for s in group if s.name not in busy and s.name not in elsewhere]
        if error is not None or ours:
            self._first.note(None if len(left) < len(group) else error)  # a shard committed: the model works
        if error is not None and left and len(left) == len(group) and self._probe is not None and self._outage is None:
            self._outage = self._probe(group)
            if self._outage is not None:
                log.error("%s; the shards not started yet are left for the next run", self._outage)
        self.rows_done += sum(s.count for s in group if s.name not in self.failed and s not in later)


def finalize(config: ExtractConfig, store: FeatureStore | None = None, stop: threading.Event | None = None,
             generation: str | None = None) -> dict:
    """Merge the commit records into manifest.json and consolidate the metadata (`FeatureStore.finalize`);
    returns the manifest. Retried like a shard (an object store's outage, a full disk being cleared;
    finalize is idempotent). Still failing, StoreError names the cause: the committed shards stay committed
    and the same command finishes the store. The library's own errors (a replaced store, a busy lease) are
    statements, not outages: raised at once. `generation`: the store's as the caller planned it
    (`FeatureStore.open`)."""
    def attempt(_n: int) -> dict:
        return (store or FeatureStore.open(config.out, config.storage_options, generation=generation)).finalize()

    try:
        return RetryPolicy.of(config).call(attempt, stop, fatal=(NeuroPredictorError,))
    except NeuroPredictorError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot finalize the output store {redact_text(config.out)!r} after "
                         f"{config.retries + 1} attempt(s): {type(exc).__name__}: {redact_text(str(exc))}. The "
                         "committed shards are kept: fix the cause (free disk space, restore access to the "
                         "storage) and run the same command again; only what is missing runs.") from exc


def _committed(is_committed: Callable[[str], bool], name: str) -> bool:
    """is_committed(name), False when the store cannot be asked (an outage must not end the loop before the
    other shards ran: this one is reported as failed, and the next run finds its commit if it has one)."""
    try:
        return is_committed(name)
    except Exception:
        return False


def failure_message(failed: dict[str, str]) -> str:
    """What a run whose shards `failed` (name -> error) tells the user: which, why, and how to resume. The
    first FAILURES_SHOWN only: it is a Prefect state message too, and 10,000 shards failing on expired
    credentials would make it megabytes."""
    tried = {k: v for k, v in failed.items() if not v.startswith(NOT_STARTED)}
    waiting = sorted(set(failed) - set(tried))
    shown = sorted(tried.items())[:FAILURES_SHOWN]
    more = f" and {len(tried) - len(shown)} more (each named in the manifest)" if len(tried) > len(shown) else ""
    why = failed[waiting[0]][len(NOT_STARTED) + 2:].rstrip(".") if waiting else ""  # FirstFailures', or the outage's
    also = f"; {len(waiting)} more were not started, since " + (
        "the first groups all failed" if why.startswith("the first ") else why) if waiting else ""
    return (f"{len(tried)} shard(s) failed after their retries: {', '.join(k for k, _ in shown)}{more}{also}. Fix "
            "the cause and run the same command again: the committed shards are kept, and only those not "
            "committed run.\n" + "\n".join(f"  {k}: {v}" for k, v in shown))


def unfinished(manifest: dict) -> dict[str, str]:
    """Shard name -> error (or 'not committed') for every shard a finalized manifest lists as not committed."""
    return {s["name"]: s.get("error") or "not committed" for s in manifest["shards"]
            if s["status"] != ShardStatus.COMMITTED}


def planned_event(store: FeatureStore, planned: dict | None = None) -> dict:
    """The "planned" progress event's data: rows and shards in total and already committed (from `store`
    or, when the plan ran elsewhere, from its `planned` dict)."""
    done = committed_names(store, planned)
    committed = [s for s in store.shards if s.name in done]
    return {"rows": store.rows, "committed_rows": sum(s.count for s in committed), "shards": len(store.shards),
            "committed_shards": len(committed)}


@contextlib.contextmanager
def _closing(readahead: Readahead, stop: threading.Event) -> Iterator[None]:
    """A run's readers started ahead are stopped as it ends; a run stopping does not wait for one opening."""
    try:
        yield
    finally:
        readahead.close(wait=not stop.is_set())


def run(config: ExtractConfig, on_event: ProgressFn | None = None, stop: threading.Event | None = None) -> dict:
    """plan -> every pending shard, one group at a time on each device, with retries -> finalize, in this
    process, without Prefect. Re-running resumes. A shard that still fails after its retries is recorded as
    failed and the others still run; the error is raised at the end, after finalize, naming the failed
    shards. Setting `stop` (Ctrl-C does it) ends the run between batches with `Interrupted`."""
    shards = validate(config)
    store = plan(config, shards)
    emit = on_event or (lambda event, data: None)
    emit("planned", planned_event(store))
    stop = stop or threading.Event()
    devices = config.resolved_devices()
    policy = RetryPolicy.of(config)

    def on_batch(n: int) -> None:
        emit("batch", {"images": n})

    def work(group: list[Shard], device: str) -> list[dict]:
        # a shard another run extracts is not waited for here: the device takes the next group meanwhile; a
        # model that is not the store's (its file changed during the run) stays so on a retry
        return policy.call(lambda attempt: extract_group(config, group, store, device, attempt, on_batch, stop,
                                                         wait_busy=False, readahead=readahead),
                           stop, fatal=(ConfigMismatchError,))

    running: dict[Future, tuple[list[Shard], str]] = {}
    told: Collection[str] = set()  # the busy shards this run last said it waits for
    readahead = Readahead()
    with _closing(readahead, stop), store.session() as session, \
            ThreadPoolExecutor(len(devices), thread_name_prefix="neuropredictor-shards") as pool:
        window = DeviceWindow(pending_groups(store, shards, shared=store.shared(session)), devices,
                              probe=functools.partial(storage_outage, store, storage_options=config.storage_options))
        readahead.upcoming = window.upcoming
        try:
            while True:
                for group, device in window.start():
                    running[pool.submit(work, group, device)] = (group, device)
                if not running:
                    waiting = window.waiting_s()
                    if waiting is None:
                        break
                    held = window.waiting_for()
                    if held.keys() != told:  # the progress stands still meanwhile: say why, once per set of shards
                        why = list(held.values())
                        log.warning("waiting for %d shard(s) that other runs extract (%s%s); this run takes each over "
                                    "if its run ends without committing it, or dies (its claim then expires)",
                                    len(why), why[0], f"; and {len(why) - 1} more" if len(why) > 1 else "")
                        told = set(held)
                    if stop.wait(min(waiting, 1.0)):  # only shards other runs extract are left: look again soon
                        raise Interrupted("stopped")
                    continue
                finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)  # wakes up for Ctrl-C
                for future in finished:
                    group, device = running.pop(future)
                    error = future.exception()
                    if isinstance(error, Interrupted) or stop.is_set():
                        raise Interrupted("stopped")
                    records = [] if error is not None else future.result()
                    window.finish(group, device, None if error is None else f"{type(error).__name__}: {error}",
                                  store.is_committed, busy={r["shard"]: r["busy"] for r in records if r.get("busy")},
                                  elsewhere={r["shard"] for r in records if done_elsewhere(r)})
                    for record in filter(news, records):
                        emit("shard", {"name": record["shard"], "record": record})
        except BaseException:
            stop.set()  # the workers end after their current batch; nothing half-written is committed
            raise
    try:
        manifest = finalize(config, store, stop)
    except NeuroPredictorError as exc:
        if window.failed:  # say both: what failed to finish and which shards are missing
            raise NeuroPredictorError(f"{exc}\n{failure_message(window.failed)}") from exc
        raise
    missing = unfinished(manifest)  # not those another run committed since
    failed = {name: why for name, why in window.failed.items() if name in missing}
    if failed:
        raise NeuroPredictorError(failure_message(failed))
    return manifest
