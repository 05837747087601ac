"""The next shard's reader, started while the current one ends: each shard starts its own decode workers
(a fork of the run's process each), and its first batch is decoded by one of them, so without it the device
waits at every shard's start. Started when the current shard's reader has handed over its last batch, the
next one's workers start and decode their first batches while that batch runs through the model and the
shard's rows are written and committed.

Which shard comes next on a device: the next of its group, else what the caller's scheduler would give that
device next (`upcoming`, a hint: a reader started for a shard the device does not take is stopped).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

import torch

from neuropredictor.corpus import Batch
from neuropredictor.shard import Shard

Reader = Iterator[Batch]


class Readahead:
    """At most one reader started ahead per device; every reader it started is taken or stopped (`close`)."""

    def __init__(self, upcoming: Callable[[str], Shard | None] | None = None) -> None:
        self.upcoming = upcoming  # the scheduler's hint: device -> the shard it gets next
        self._lock = threading.Lock()
        self._started: dict[str, tuple[str, Future]] = {}  # device -> (shard name, its first batch and reader)
        self._closed = False  # a shard still ending after `close` starts nothing more

    def after(self, group: Sequence[Shard], index: int, device: str) -> Shard | None:
        """The shard expected on `device` after group[index]: the group's next, else the scheduler's hint."""
        if index + 1 < len(group):
            return group[index + 1]
        return self.upcoming(device) if self.upcoming is not None else None

    def start(self, device: str, shard: Shard, open_reader: Callable[[Shard], Reader]) -> None:
        """Start reading `shard` for `device` on a thread of its own (its workers start, its first batch is
        decoded); a reader started before for the device, and not taken, is stopped."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                return
            old = self._started.pop(device, None)
            self._started[device] = (shard.name, future)
        if old is not None:
            _stop(old[1], wait=False)
        cuda = torch.device(device).type == "cuda"
        try:
            # not a daemon: a process that exits (Ctrl-C) while this thread is inside torch's DataLoader start
            # aborted ("terminate called without an active exception", exit -6, seen in CI); exit waits for the
            # reader to open (its first batch), which then closes itself (`_stop`)
            threading.Thread(target=_open, args=(future, open_reader, shard, device if cuda else None),
                             name=f"neuropredictor-readahead-{shard.name}", daemon=False).start()
        except BaseException as exc:  # no thread to be had: the shard is read when its turn comes, as without
            with self._lock:
                if self._started.get(device, (None, None))[1] is future:
                    del self._started[device]
            future.set_exception(exc)

    def take(self, device: str, shard: Shard) -> Reader | None:
        """The reader started for `shard` on `device`, from its first batch (what opening it raised is raised
        at the first batch, as a reader's own error would be); None if none was (a reader started for another
        shard is stopped)."""
        with self._lock:
            started = self._started.pop(device, None)
        if started is None:
            return None
        name, future = started
        if name != shard.name:
            _stop(future, wait=False)  # (this shard does not wait for another's download)
            return None
        return _Taken(future)

    def close(self, wait: bool = True) -> None:
        """Stop every reader started and not taken (their decode workers exit); with wait=False (a run
        stopping), those still opening stop as soon as they are open, and this returns at once."""
        with self._lock:
            started, self._started, self._closed = list(self._started.values()), {}, True
        for _name, future in started:
            _stop(future, wait)


def _open(future: Future, open_reader: Callable[[Shard], Reader], shard: Shard, device: str | None) -> None:
    try:
        if device is not None:  # the pinning thread of the loader pins for the current device
            torch.cuda.set_device(device)
        reader = open_reader(shard)
        future.set_result((next(reader, None), reader))
    except BaseException as exc:  # the shard's own error, raised where it is taken
        future.set_exception(exc)


def _stop(future: Future, wait: bool) -> None:
    """Close the reader a future opens: now (waiting for it to open), or once it is open."""
    if wait:
        if future.exception() is None:  # waits; an interrupt of the wait (Ctrl-C, a cancel) goes through
            _close(future.result()[1])
    else:
        future.add_done_callback(lambda f: f.exception() is None and _close(f.result()[1]))


def _close(reader: Reader) -> None:
    close = getattr(reader, "close", None)
    if close is not None:
        close()


class _Taken:
    """A reader started ahead, as its consumer takes it: its first batch, then the rest; `close` stops it."""

    def __init__(self, future: Future) -> None:
        self._future = future
        self._reader: Reader | None = None

    def __iter__(self) -> _Taken:
        return self

    def __next__(self) -> Batch:
        if self._reader is None:
            first, self._reader = self._future.result()
            if first is not None:
                return first
        return next(self._reader)

    def close(self) -> None:
        if self._reader is None:  # not begun (stopped at once): it closes when open, nobody waits for it
            _stop(self._future, wait=False)
        else:
            _close(self._reader)
