"""Extracting one shard: read -> decode/preprocess -> forward + reduce -> write rows (on a background
thread) -> commit."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator

import numpy as np
import torch

from neuropredictor.config import ExtractConfig
from neuropredictor.corpus import Batch, read_shard
from neuropredictor.corpus.listing import source_of
from neuropredictor.errors import CorpusError, Interrupted
from neuropredictor.pipeline.planning import identity
from neuropredictor.pipeline.readahead import Readahead
from neuropredictor.pipeline.replicas import Runner, get_runner
from neuropredictor.shard import Shard
from neuropredictor.store import FeatureStore, ShardCommitted
from neuropredictor.store.locks import Lease, process_id


class _BackgroundWriter:
    """Copies features to the host and writes them, on a thread with a bounded queue: the model never
    waits for storage, and memory stays bounded (at most `depth` batches in flight)."""

    def __init__(self, write: Callable[..., None], depth: int = 4) -> None:
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.wait_s = 0.0  # time the producer spent blocked on a full queue
        self._thread = threading.Thread(target=self._loop, name="neuropredictor-writer", daemon=True)
        self._thread.start()

    def put(self, start: int, keys: list[str], valid: np.ndarray, features: dict[str, torch.Tensor]) -> None:
        self._raise()
        host, event = {}, None
        for name, t in features.items():
            # float32 also for a float16 store: the writer casts, and refuses values float16 cannot hold
            # (cast here, they would reach it as inf). On the GPU: async D2H into pinned memory, and the
            # writer waits on the event.
            t = t.float()
            # (another device, e.g. Apple's mps: a plain copy, since the writer's numpy() takes host tensors only)
            host[name] = torch.empty(t.shape, pin_memory=True).copy_(t, non_blocking=True) if t.is_cuda else t.cpu()
        on_gpu = [t.device for t in features.values() if t.is_cuda]
        if on_gpu:  # recorded on the copies' own stream: the current device is cuda:0 in every thread
            event = torch.cuda.Event(blocking=True)  # the writer thread sleeps on it, rather than spinning a core
            event.record(torch.cuda.current_stream(on_gpu[0]))
        t0 = time.perf_counter()
        while True:  # bounded wait: a dead writer thread must not block the producer forever
            try:
                self._queue.put((start, keys, valid, host, event), timeout=1.0)
                break
            except queue.Full:
                self._raise()
        self.wait_s += time.perf_counter() - t0

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure so the producer is never stuck
            start, keys, valid, host, event = item
            try:
                if event is not None:
                    event.synchronize()
                self._write(start, keys, valid, {k: v.numpy() for k, v in host.items()})
            except BaseException as exc:  # handed to the producer thread
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()


def extract_shard(config: ExtractConfig, shard: Shard, store: FeatureStore | None = None,
                  device: str | torch.device | None = None,
                  on_batch: Callable[[int], None] | None = None, attempt: int = 1,
                  stop: threading.Event | None = None, readahead: Readahead | None = None,
                  then: Callable[[], Shard | None] | None = None) -> dict:
    """Extract one shard into the store and commit it; a committed shard is skipped (returns its record).

    on_batch(n) is called after each batch (progress bars). attempt is recorded in the commit record (the
    orchestrator's retry count). When `stop` is set, the shard ends after its current batch with
    `Interrupted`, uncommitted. Returns the shard's commit record. Raises ShardBusy (nothing done) while
    another run extracts the shard. `readahead`: where the shard's reader may have been started ahead, and
    where, once this shard's last batch is read, the reader of the shard `then()` names is started.
    """
    store = store or FeatureStore.open(config.out, config.storage_options)
    done = store.commit_record(shard.name)  # one read of this shard's record, not a listing of all
    if done is not None:
        return done | {"skipped": True}
    # the model first (loaded once per process): a claim is held only while its rows advance (`locks.stuck`)
    runner = get_runner(config, device)
    store.check_config(identity(config, runner))  # reloaded since the plan if its files changed: the same model?
    with store.claim(shard) as claim:  # ShardBusy while another run extracts it
        try:
            return _extract_claimed(config, shard, store, claim, runner, on_batch, attempt, stop, readahead, then)
        except ShardCommitted:  # the claim's last holder committed it after this run looked: its commit stands
            return (store.commit_record(shard.name) or {}) | {"skipped": True}


def _extract_claimed(config: ExtractConfig, shard: Shard, store: FeatureStore, claim: Lease, runner: Runner,
                     on_batch: Callable[[int], None] | None, attempt: int, stop: threading.Event | None,
                     readahead: Readahead | None, then: Callable[[], Shard | None] | None) -> dict:
    started = time.time()
    t0 = time.perf_counter()
    writer = store.writer(shard, replace_commit=False, claim=claim)
    claim.progress = lambda: writer.rows  # renewals say how far it got: others can tell it is not stuck
    # what the shard's file is, taken while it is extracted: on local disk its sha256 reads the whole file
    # (about 0.5 s per GB), which after the shard would idle the device for as long
    fingerprint = ThreadPoolExecutor(1, thread_name_prefix="neuropredictor-source")
    source = fingerprint.submit(source_of, shard, config.storage_options)
    fingerprint.shutdown(wait=False)
    background = _BackgroundWriter(writer.write)
    bad: list[dict] = []
    n_valid = 0
    # where the time goes: blocked on input (decode-bound), decoding on the device, blocked on the writer
    # (storage-bound); the rest is forward + reductions (compute-bound)
    input_wait = device_decode = 0.0
    decoder = runner.decoder

    def open_reader(s: Shard) -> Iterator[Batch]:
        return iter(read_shard(s, runner.model.transform if decoder is None else None, config.batch_size,
                               config.resolved_workers(), config.storage_options,
                               pin_memory=runner.device.type == "cuda" and decoder is None))

    here = str(runner.device)
    batches = (readahead.take(here, shard) if readahead is not None else None) or open_reader(shard)
    try:
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted(f"stopped during shard {shard.name}; it was not committed and runs again next time")
            t_wait = time.perf_counter()
            batch = next(batches, None)
            input_wait += time.perf_counter() - t_wait
            if batch is None:
                break
            if readahead is not None and then is not None and int(batch.index[-1]) + 1 == shard.count:
                if (upcoming := then()) is not None:  # the last batch is read: the next shard's reader starts
                    readahead.start(here, upcoming, open_reader)
            if decoder is not None:
                t_dec = time.perf_counter()
                batch = decoder(batch)
                device_decode += time.perf_counter() - t_dec
            feats = runner.extractor(batch.images)
            valid = batch.valid.numpy().copy()
            n_valid += int(valid.sum())
            bad += [{"key": k, "reason": r} for k, r in batch.errors.items()]
            background.put(int(batch.index[0]), list(batch.keys), valid, feats)
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        batches.close()  # stops the decode workers now, also when the shard ends in an error
        t_flush = time.perf_counter()
        background.close()
    if writer.rows != shard.count:  # the readers check counts; this guards the commit against any that did not
        raise CorpusError(f"shard {shard.name}: {writer.rows} of its {shard.count} rows were read; it is not "
                          "committed, and runs again next time")
    stats = writer.close()
    flush = time.perf_counter() - t_flush
    duration = time.perf_counter() - t0
    stages = {"input_wait_s": round(input_wait, 3), "device_decode_s": round(device_decode, 3),
              "writer_wait_s": round(background.wait_s, 3), "flush_s": round(flush, 3),
              "compute_s": round(duration - input_wait - device_decode - background.wait_s - flush, 3)}
    record = {
        "rows": shard.count,
        "valid": n_valid,
        "invalid": shard.count - n_valid,
        "bad_samples": bad,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(duration, 3),
        "images_per_s": round(shard.count / duration, 2) if duration > 0 else None,
        "device": _device_name(runner.device),
        "host": socket.gethostname(),
        # which worker did it (a pod, a GPU box); set by the deployment, defaults to the host name
        "worker": os.environ.get("NEUROPREDICTOR_WORKER_ID") or socket.gethostname(),
        "pid": os.getpid(),
        "process": process_id(),  # which process committed it (a run sharing the store tells its own from others')
        "batch_size": config.batch_size,
        "attempts": attempt,
        "stages": stages,
        "stats": stats,
        "source": source.result(),  # what the rows came from (see plan)
    }
    return writer.commit(record)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
