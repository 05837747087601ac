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
(`<lease>.taken-<digest of its bytes>`) removes it. A holder whose lease was taken over anyway (its renewals failed for a whole lifetime) stops
renewing it and `check()` says so, instead of writing it back. Clocks of different machines are compared,
so they must agree to well within the lifetime (NTP does that).
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
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor.errors import StoreError

LEASE_SECONDS = 60.0
_POLL_SECONDS = 0.5
_KEEP_LIFETIMES = 10  # how many lifetimes a spent take-over marker or temporary file is kept before clear_dead


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


_MACHINE = _machine()


def _record(run_id: str, what: str, seconds: float) -> dict:
    now = time.time()
    return {"run_id": run_id, "what": what, "host": socket.gethostname(), "pid": os.getpid(),
            "machine": _MACHINE, "renewed_at": now, "expires_at": now + seconds}


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


def _gone_here(lease: dict) -> bool:
    pid = lease.get("pid")
    if _MACHINE is None or lease.get("machine") != _MACHINE or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists, as another user's process
        return False
    return False


class Lease:
    """A lease held by this process; renewed on a daemon thread until released. An exclusive lease found
    in other hands at a renewal is lost: it is not written back, and `check()` raises."""

    def __init__(self, fs: Any, path: str, run_id: str, what: str, seconds: float, exclusive: bool) -> None:
        self._fs, self.path, self.run_id, self.what, self.seconds = fs, path, run_id, what, seconds
        self.exclusive, self.lost = exclusive, False
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

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            with contextlib.suppress(Exception):  # a missed renewal is retried; expiry is the only harm
                if self.exclusive and not self._held():
                    self.lost = True  # taken over, or about to be: writing it back would make two holders
                    return
                fsx.write_json_atomic(self._fs, self.path, _record(self.run_id, self.what, self.seconds))

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


def try_acquire(fs: Any, path: str, what: str) -> Lease | dict:
    """Take the exclusive lease at path now, or return its live holder's record; a dead holder is taken over."""
    seconds = LEASE_SECONDS  # read now: tests shorten it
    run_id = new_run_id()
    for _ in range(100):  # each turn, another process created, released or took over the lease meanwhile
        if fsx.create_exclusive(fs, path, fsx.json_bytes(_record(run_id, what, seconds))):
            return Lease(fs, path, run_id, what, seconds, exclusive=True).start()
        found = _read_raw(fs, path)
        if found is None:
            continue  # released just now
        raw, holder = found
        if not expired(holder):
            return holder
        _take_over(fs, path, raw, seconds)
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
    fsx.write_json_atomic(fs, path, _record(run_id, what, LEASE_SECONDS))
    return Lease(fs, path, run_id, what, LEASE_SECONDS, exclusive=False).start()


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
