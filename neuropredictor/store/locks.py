"""Who is working on a store: leases that expire unless renewed.

    _locks/plan.json        one planner at a time (creating, resuming or replacing the arrays)
    _locks/finalize.json    one finalize at a time (the only writer of shared chunks), or a replacement
    _locks/shards/<shard>.json
                            one run at a time extracts a shard (runs sharing a store share its shards)
    _runs/<run id>.json     every run extracting into the store; replacing the store is refused while one lives

A lease names its owner (host, pid, run id) and when it expires; a heartbeat thread renews it every third
of its lifetime. The owner of a lease that stops being renewed (kill -9, a lost machine) is taken for dead
once it has expired, and the lease can be taken over; an owner on this machine whose process is gone is
dead at once (a run killed for its memory resumes without waiting out its own leases). Exclusive leases
are created with an atomic create-if-absent (`fs.create_exclusive`); object stores have no conditional
delete, so of the processes that find a lease expired, only the one that first creates its marker
(`<lease>.taken-<digest of its bytes>`) removes it. A holder whose lease was taken over anyway (its renewals
failed for a whole lifetime) stops renewing it and `check()` says so, instead of writing it back. Clocks of
different machines are compared, so they must agree to well within the lifetime (NTP does that).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor.errors import StoreError

LEASE_SECONDS = 60.0
_POLL_SECONDS = 0.5
_KEEP_LIFETIMES = 10  # how many lifetimes a spent take-over marker or temporary file is kept before clear_dead
# a holder that reports its progress (a shard's claim: rows written) and made none for this long is stuck: a hung
# decoder or device call keeps a process, and so its lease, alive (a model that takes longer to load counts too:
# that run then stops at its first write)
STUCK_SECONDS = 1800.0


def new_run_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class StoreBusyError(StoreError):
    """Another run holds the store (planning, finalizing, or extracting when a replacement was asked)."""


def describe(lease: dict) -> str:
    age = time.time() - float(lease.get("renewed_at", 0))
    return (f"run {lease.get('run_id')} ({lease.get('what', 'working')}) on host {lease.get('host')} pid "
            f"{lease.get('pid')}, last seen {age:.0f} s ago")


def _machine() -> str | None:
    """Which kernel and process namespace a pid belongs to (Linux): the boot id and the pid namespace, so that
    a pid is only ever looked up where it means the same process; None elsewhere (leases then expire only)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process(pid: int | str) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process on this machine, None if its /proc entry
    cannot be read (no such process, or one that `hidepid` hides)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "pid (command name)", which may hold spaces
    except OSError:
        return None
    return fields[0], fields[19]


_MACHINE = _machine()
_STARTED: str | None = None  # with the pid, this process: a pid used again is another one
_PROCESS_ID = ""


def _this_process() -> None:
    global _STARTED, _PROCESS_ID
    _STARTED = (_process("self") or ("", None))[1]
    _PROCESS_ID = uuid.uuid4().hex


_this_process()
os.register_at_fork(after_in_child=_this_process)  # a forked worker is another process, started later


def process_id() -> str:
    """This process, in records that say who wrote them (a forked child has its own)."""
    return _PROCESS_ID


def _record(run_id: str, what: str, seconds: float, progress: Any = None, progressed_at: float | None = None,
            now: float | None = None) -> dict:
    now = time.time() if now is None else now
    return {"run_id": run_id, "what": what, "host": socket.gethostname(), "pid": os.getpid(),
            "machine": _MACHINE, "started": _STARTED, "progress": progress, "progressed_at": progressed_at,
            "renewed_at": now, "expires_at": now + seconds}


def _read_raw(fs: Any, path: str) -> tuple[bytes, dict] | None:
    """The lease at path as stored and as read, or None if there is none; a damaged one counts as expired
    (its writer died half-way). One GET on S3."""
    try:
        raw = fsx.cat_small(fs, path)
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(raw)
    except ValueError:
        lease = None
    return raw, lease if isinstance(lease, dict) else {"expires_at": 0}


def _read(fs: Any, path: str) -> dict | None:
    """The lease at path (see _read_raw)."""
    found = _read_raw(fs, path)
    return None if found is None else found[1]


def expired(lease: dict) -> bool:
    """Whether the lease's owner is taken for dead: it expired, or its process is gone from this machine."""
    return time.time() > float(lease.get("expires_at", 0)) or _gone_here(lease)


def stuck(lease: dict) -> bool:
    """Whether a holder that reports its progress has made none for STUCK_SECONDS."""
    at = lease.get("progressed_at")
    return isinstance(at, (int, float)) and time.time() - at > STUCK_SECONDS


def _gone_here(lease: dict) -> bool:
    """Whether the lease's process was on this machine and is gone: no such pid, a zombie, or a pid that
    another process has taken since (its start time differs)."""
    pid = lease.get("pid")
    if _MACHINE is None or lease.get("machine") != _MACHINE or not isinstance(pid, int) or pid == os.getpid():
        return False
    found = _process(pid)
    if found is None:  # no such process, or another user's that /proc hides: signal 0 tells which
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    return found[0] == "Z" or (lease.get("started") is not None and found[1] != lease["started"])


class Lease:
    """A lease held by this process; renewed on a daemon thread until released. An exclusive lease found
    in other hands at a renewal is lost: it is not written back, and `check()` raises. A lease that reports
    progress (`progressed_at` set) records, at each renewal, the value of `progress()` (a shard's rows
    written) and when it last changed, so that others can tell a holder that is alive but stuck (`stuck`)."""

    def __init__(self, fs: Any, path: str, record: dict, seconds: float, exclusive: bool) -> None:
        self._fs, self.path, self.run_id, self.what = fs, path, record["run_id"], record["what"]
        self.seconds, self.exclusive, self.lost = seconds, exclusive, False
        self.expires_at = record["expires_at"]  # as last written here: what `valid_now` trusts without a read
        self.progressed_at = record["progressed_at"]
        self.progress: Callable[[], Any] | None = None
        self._progress: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="neuropredictor-lease", daemon=True)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _held(self) -> bool:
        """Whether the lease at path is still this run's, with a sixth of its lifetime left (one missed
        renewal leaves a third): a taker takes it only once expired, so a renewal written now cannot land
        on a taker's lease."""
        current = _read(self._fs, self.path)
        return (current is not None and current.get("run_id") == self.run_id
                and float(current.get("expires_at", 0)) - time.time() > self.seconds / 6)

    def valid_now(self) -> bool:
        """Whether the lease, as this process last wrote it, has a sixth of its lifetime left (no read: the
        wall clock, so a machine that was suspended finds its lease run out)."""
        return not self.lost and self.expires_at - time.time() > self.seconds / 6

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3) and self.renew():
            pass

    def renew(self) -> bool:
        """Write the lease again now, with its progress (the heartbeat does, every third of its lifetime);
        False once it is lost."""
        with contextlib.suppress(Exception):  # a missed renewal is retried; expiry is the only harm
            if self.exclusive and not self._held():
                self.lost = True  # taken over, or about to be: writing it back would make two holders
                return False
            now, value = time.time(), self.progress() if self.progress else None
            if self.progressed_at is not None and value != self._progress:
                self._progress, self.progressed_at = value, now
            if self.progressed_at is not None and now - self.progressed_at > STUCK_SECONDS - self.seconds:
                # about to count as stuck: stop renewing before others take it over, as at expiry (a renewal
                # written then could land on the taker's lease)
                self.lost = True
                return False
            record = _record(self.run_id, self.what, self.seconds, value, self.progressed_at, now)
            fsx.write_json_atomic(self._fs, self.path, record)
            self.expires_at = record["expires_at"]
        return True

    def check(self) -> None:
        """Raise StoreBusyError unless the lease is still this run's (read now): before a write only its
        holder may make."""
        if self.lost or not self._held():
            self.lost = True
            holder = _read(self._fs, self.path)
            raise StoreBusyError(f"lost the lease {self.path} while {self.what} (it was not renewed for "
                                 f"{self.seconds:.0f} s: storage unreachable?)"
                                 + (f"; now held by {describe(holder)}" if holder else "")
                                 + ". Nothing more was written; run again.")

    def release(self) -> None:
        self._stop.set()
        # a renewal being written now would put the lease back after its removal: let it end first
        self._thread.join(timeout=self.seconds / 3)
        if self._thread.is_alive():
            return  # still writing (storage that slow): removed now, its late write could land on a new holder's
        # Storage unreachable (an outage): the lease expires by itself; failing here would hide the run's
        # own outcome (its failed shards, or its finalize error).
        with contextlib.suppress(Exception):
            current = _read(self._fs, self.path)
            if current is not None and current.get("run_id") == self.run_id:
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def try_acquire(fs: Any, path: str, what: str, progress: bool = False) -> Lease | dict:
    """Take the exclusive lease at path now, or return its holder's record while it lives; a dead holder is
    taken over, and so is a stuck one (`stuck`). `progress`: the lease reports its holder's progress (see
    `Lease`)."""
    seconds = LEASE_SECONDS  # read now: tests shorten it
    run_id = new_run_id()
    for _ in range(100):  # each turn, another process created or released the lease meanwhile
        now = time.time()
        record = _record(run_id, what, seconds, progressed_at=now if progress else None, now=now)
        if fsx.create_exclusive(fs, path, fsx.json_bytes(record)):
            return Lease(fs, path, record, seconds, exclusive=True).start()
        found = _read_raw(fs, path)
        if found is None:
            continue  # released just now
        raw, holder = found
        if not expired(holder) and not stuck(holder):
            return holder
        if not _take_over(fs, path, raw, seconds):
            return holder  # another process is taking it over (or a taker died at it: its marker ages out)
    raise StoreBusyError(f"could not take the lease {path}: it changed hands 100 times in a row")


def acquire(fs: Any, path: str, what: str, wait_s: float) -> Lease:
    """Take the exclusive lease at path, waiting up to wait_s for a live holder to release it; a dead
    holder is taken over. Raises StoreBusyError naming the holder when the wait runs out."""
    deadline = time.monotonic() + wait_s
    for _ in range(1_000_000):  # bounded by the deadline in practice
        got = try_acquire(fs, path, what)
        if isinstance(got, Lease):
            return got
        if time.monotonic() >= deadline:
            raise StoreBusyError(f"the store is busy: {describe(got)}. Wait for it to finish, or stop it; a "
                                 f"lease not renewed for {LEASE_SECONDS:.0f} s counts as dead.")
        time.sleep(_POLL_SECONDS)
    raise StoreBusyError(f"could not take the lease {path}")  # pragma: no cover


def _take_over(fs: Any, path: str, raw: bytes, seconds: float) -> bool:
    """Remove the expired lease `raw` at path, if this process is the one to: the first to create its marker.
    Reading it twice and deleting let a slower taker delete the lease a faster one had just created.
    Returns whether this process removed it."""
    marker = f"{path}.taken-{hashlib.sha256(raw).hexdigest()[:16]}"
    if fsx.create_exclusive(fs, marker, b""):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
        return True
    # the same bytes again, long after (a damaged lease torn the same way): that marker is spent
    with contextlib.suppress(Exception):
        if time.time() - (fsx.modified(fs.info(marker)) or time.time()) > seconds:
            fs.rm_file(marker)
    time.sleep(_POLL_SECONDS / 10)
    return False


def register(fs: Any, path: str, what: str, run_id: str) -> Lease:
    """A non-exclusive lease: this run is working here (several runs may hold one each)."""
    record = _record(run_id, what, LEASE_SECONDS)
    fsx.write_json_atomic(fs, path, record)
    return Lease(fs, path, record, LEASE_SECONDS, exclusive=False).start()


def live(fs: Any, folder: str) -> list[dict]:
    """The leases in folder whose owners are alive."""
    leases = (_read(fs, path) for path in fsx.listing(fs, folder) if path.endswith(".json"))
    return [lease for lease in leases if lease is not None and not expired(lease)]


def clear_dead(fs: Any, folder: str, exclusive: bool) -> int:
    """Remove what dead runs left in folder: their leases (exclusive ones the way a taker removes them, so
    that a lease taken over meanwhile stays), and spent take-over markers and temporary files older than
    _KEEP_LIFETIMES lifetimes. Returns how many objects went."""
    removed = 0
    seconds = LEASE_SECONDS
    for info in _infos(fs, folder):
        path, name = info["name"], fsx.basename(info["name"])
        if name.endswith(".json"):
            found = _read_raw(fs, path)
            if found is None or not expired(found[1]):
                continue
            if exclusive:
                removed += _take_over(fs, path, found[0], seconds)
            else:  # a run record: its run, alive after all (renewals that failed for a lifetime), writes it back
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
                    removed += 1
        elif ".taken-" in name or fsx.published_name(name) != name:
            if time.time() - (fsx.modified(info) or time.time()) > _KEEP_LIFETIMES * seconds:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
                    removed += 1
    return removed


def _infos(fs: Any, folder: str) -> list[dict]:
    fsx.invalidate(fs, folder)
    try:
        return [i for i in fs.ls(folder, detail=True) if i.get("type") != "directory"]
    except FileNotFoundError:
        return []
