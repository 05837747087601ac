"""The data path of one run, as library calls (`neuropredictor.schedule` runs them shard after shard and
finalizes the store, the Prefect flows as tasks):

    validate(config)              model loads, layers resolve, corpus reachable: before anything is written
    plan(config)                  validate, then create the Zarr store (or reopen it to resume)
    extract_shard(config, shard)  read -> decode/preprocess -> forward + reduce -> write rows -> commit
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from neuropredictor import fs as fsx
from neuropredictor.config import IDENTITY, ExtractConfig
from neuropredictor.corpus import list_shards, read_shard
from neuropredictor.corpus.folder import is_image_folder, shards_for
from neuropredictor.corpus.listing import changed_since, source_of
from neuropredictor.errors import (
    CorpusError,
    Interrupted,
    NeuroPredictorError,
    StoreError,
)
from neuropredictor.extractor import Extractor
from neuropredictor.models import LoadedModel, load_model
from neuropredictor.redact import redact_text
from neuropredictor.shard import Shard
from neuropredictor.store import FeatureStore, LayerSpec
from neuropredictor.store.feature_store import plan_shards

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # imported when used: torchvision's decoders cost start-up time nobody else needs
    from neuropredictor.device_decode import DeviceDecoder


@dataclass
class Runner:
    """One model replica on one device, with its hooks in place; reused for every shard of a run."""

    model: LoadedModel
    extractor: Extractor
    device: torch.device
    decoder: DeviceDecoder | None = None  # decode="device": decoding and preprocessing on `device`

    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(p.name, p.out_shape, str(p.reduction)) for p in self.extractor.plan.values()]


# One replica per device at a time: a run over many models (a sweep, a notebook loop) keeps GPU memory
# and RAM flat, since loading the next model on a device releases the one before.
_RUNNERS: dict[str, tuple[tuple, Runner]] = {}
_RUNNERS_LOCK = threading.Lock()


def check_device(name: str | torch.device) -> torch.device:
    """The torch device `name` means, or a NeuroPredictorError when this machine cannot run on it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise NeuroPredictorError(f"unknown device {str(name)!r}: use `device` auto, cpu, cuda, cuda:N (or "
                                  "several, comma-separated) or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise NeuroPredictorError(f"device {str(name)!r} needs a CUDA GPU, but PyTorch sees none on this machine "
                                      "(no driver, or a CPU-only torch): use `device` cpu, or `device` auto to "
                                      "use GPUs where there are some")
        if dev.index is not None and dev.index >= count:
            raise NeuroPredictorError(f"device {str(name)!r} does not exist: this machine has {count} CUDA GPU(s), "
                                      f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise NeuroPredictorError(f"device {str(name)!r} is not available on this machine: use `device` cpu")
    elif dev.type != "cpu":
        raise NeuroPredictorError(f"device {str(name)!r} is not supported: use `device` auto, cpu, cuda, cuda:N or mps")
    return dev


def _device(config: ExtractConfig, device: str | torch.device | None) -> torch.device:
    dev = check_device(device if device is not None else config.resolved_devices()[0])
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" share one replica
    return dev


def get_runner(config: ExtractConfig, device: str | torch.device | None = None) -> Runner:
    """The process's replica for this model/layers/device, loaded on first use (never per shard); it
    replaces the device's previous replica, if that was another one."""
    dev = _device(config, device)
    key = config.replica_key()
    with _RUNNERS_LOCK:
        cached = _RUNNERS.get(str(dev))
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None:
            del cached
            release_runners(str(dev))
        model = load_model(config.model, pretrained=config.pretrained, weights=config.weights)
        decoder = None
        if config.decode == "device":
            from neuropredictor.device_decode import DeviceDecoder

            decoder = DeviceDecoder(model.transform, dev, model.input_size)
        ex = Extractor(model, config.layers, reduce=config.reduce, device=dev, precision=config.precision,
                       channels_last=config.channels_last, srp_seed=config.srp_seed, compile=config.compile)
        runner = Runner(model, ex.__enter__(), dev, decoder)
        _RUNNERS[str(dev)] = (key, runner)
        return runner


def release_runners(device: str | None = None) -> None:
    """Drop the cached replica of a device (every device by default) and give its memory back. A shard
    still running on it keeps its own reference until it ends."""
    import gc

    for dev in [device] if device is not None else list(_RUNNERS):
        _RUNNERS.pop(dev, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# How each IDENTITY field of the config enters the store's identity, resolved by the loaded replica
# (the checksum of a weights file, the layers a glob matched, each layer's reduction). pretrained and
# weights become one entry: what was loaded.
_RESOLVED = {
    "pretrained": lambda config, runner: ("weights", runner.model.weights),
    "weights": lambda config, runner: ("weights", runner.model.weights),
    "layers": lambda config, runner: ("layers", runner.extractor.layers),
    "reduce": lambda config, runner: ("reductions", {p.name: str(p.reduction) for p in runner.extractor.plan.values()}),
}


def identity(config: ExtractConfig, runner: Runner) -> dict:
    """The fields that determine the stored numbers (a store made with other values is another run), and
    the model's input size they imply."""
    out: dict = {}
    for name in ExtractConfig.fields_with(IDENTITY):
        key, value = _RESOLVED[name](config, runner) if name in _RESOLVED else (name, getattr(config, name))
        out[key] = value
        if name == "model":
            out["input_size"] = list(runner.model.input_size)
    return out


def validate(config: ExtractConfig) -> list[Shard]:
    """Everything that can be checked before a store is touched: the model loads, the layers resolve,
    the reductions fit, the corpus is reachable and non-empty. Returns the corpus's shards (for a folder of
    images, the shards made of it beside the store: see corpus.folder)."""
    for device in config.resolved_devices():
        check_device(device)
    get_runner(config)
    corpus = config.corpus
    if is_image_folder(corpus):
        corpus = shards_for(corpus, config.out, config.storage_options)
    shards = list_shards(corpus, config.storage_options, known=lambda: planned_shards(config))
    if not any(s.count for s in shards):  # a store of 0 rows would report "complete" for nothing
        raise CorpusError(
            f"no images in the corpus {config.corpus!r}: its {len(shards)} shard(s) hold no samples. Check "
            "the shards (`tar tf SHARD`), or make them with `neuropredictor shards make`."
        )
    check_output(config.out, config.storage_options)
    return shards


def planned_shards(config: ExtractConfig) -> list[Shard]:
    """The shards the store at `out` was planned with, if there is one: a resume, or a child run of a
    distributed extraction, counts unindexed shards that have not changed from them instead of reading
    the whole corpus again to count its samples."""
    try:
        return plan_shards(config.out, config.storage_options)
    except Exception:  # a store we cannot read now: the shards are counted from their tars
        return []


def check_output(url: str, storage_options: dict | None = None) -> None:
    """Fail early, writing nothing, when the output cannot be created: its nearest existing ancestor must
    be a directory (or, on object stores, the bucket must exist)."""
    fs, path = fsx.connect(url, storage_options, error=StoreError, what="output store")
    try:
        probe = path
        for _ in range(64):  # bounded walk up to the nearest existing ancestor
            if fs.exists(probe):
                if not fs.isdir(probe):
                    raise StoreError(f"cannot create the output store {redact_text(url)!r}: {probe!r} is a file, "
                                     "not a folder. Choose another `out`.")
                return
            parent = fs._parent(probe)
            if not parent or parent == probe:
                break
            probe = parent
        raise StoreError(f"cannot create the output store {redact_text(url)!r}: its bucket {probe!r} does not exist")
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot reach the output store {redact_text(url)!r}: {type(exc).__name__}: "
                         f"{redact_text(str(exc))}") from exc


def plan(config: ExtractConfig, shards: list[Shard] | None = None) -> FeatureStore:
    """Validate, then create the store (or reopen it, to resume).

    Fails fast with a NeuroPredictorError on an unknown model or layer, an unreachable or empty corpus,
    or an output that exists with a different configuration (nothing is written then).
    """
    shards = shards if shards is not None else validate(config)
    runner = get_runner(config)
    try:
        store = FeatureStore.create(
            config.out, shards, runner.layer_specs(), identity(config, runner), dtype=config.dtype,
            compression=config.compression, storage_options=config.storage_options, overwrite=config.overwrite,
        )
    except OSError as exc:  # a read-only folder, a full disk: name the store, not a line of zarr's code
        raise StoreError(f"cannot write the output store {redact_text(config.out)!r}: {type(exc).__name__}: "
                         f"{redact_text(str(exc))}. Choose an `out` you can write to, or fix its permissions "
                         "or free space.") from exc
    commits = store.committed()  # read once, here, for the whole plan
    _refuse_changed_files(store, shards, config, commits)
    if config.verify:
        store.withdraw(store.verify({name: r for name, r in commits.items() if name not in store.withdrawn}))
    store.committed_at_plan = frozenset(name for name in commits if name not in store.withdrawn)
    for line in plan_messages(store):
        log.warning("%s", line)
    return store


def plan_messages(store: FeatureStore) -> list[str]:
    """What the plan changed in the store, in words: what `overwrite=True` deleted, and the committed
    shards it took back, each with why (damaged, found by `verify=True`; or its file changed, with
    `overwrite=True`): they are extracted again."""
    out = []
    if replaced := store.replaced:
        kept = replaced.get("kept") or []
        out.append(f"overwrite=True replaced a store made with another configuration "
                   f"({replaced.get('committed_shards', 0)} of {replaced.get('shards', '?')} shards committed): "
                   f"deleted {', '.join(replaced.get('deleted', [])) or 'nothing'}"
                   + (f"; left alone: {', '.join(kept)}" if kept else ""))
    if withdrawn := store.withdrawn:
        out.append(f"{len(withdrawn)} committed shard(s) are extracted again: "
                   + "; ".join(f"{name} ({why})" for name, why in sorted(withdrawn.items())))
    return out


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

    def put(self, start: int, keys: list[str], valid: np.ndarray, features: dict[str, torch.Tensor],
            dtype: torch.dtype) -> None:
        self._raise()
        host, event = {}, None
        for name, t in features.items():
            t = t.to(dtype)
            if t.is_cuda:  # async D2H into pinned memory; the writer waits on the event, not the stream
                buf = torch.empty(t.shape, dtype=dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                host[name] = buf
            else:
                host[name] = t
        if any(t.is_pinned() for t in host.values()):
            event = torch.cuda.Event()
            event.record()
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


def _refuse_changed_files(store: FeatureStore, shards: list[Shard], config: ExtractConfig,
                          commits: dict[str, dict]) -> None:
    """A committed shard whose file changed since its rows were extracted would leave the store mixing two
    versions of the corpus: refuse, naming the shards; with overwrite=True, extract those shards again."""
    changed = [s.name for s in shards if s.name in commits and "source" in commits[s.name]
               and changed_since(commits[s.name]["source"], s, config.storage_options)]
    if changed and config.overwrite:
        store.withdraw({name: "its shard file changed since its rows were extracted" for name in changed})
    elif changed:
        raise CorpusError(f"{len(changed)} shard(s) changed since their rows were extracted into "
                          f"{redact_text(store.url)!r}: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. "
                          "The store would mix two versions of the corpus: restore the original files, or extract "
                          "them again (overwrite=True).")


def extract_shard(config: ExtractConfig, shard: Shard, store: FeatureStore | None = None,
                  device: str | torch.device | None = None,
                  on_batch: Callable[[int], None] | None = None, attempt: int = 1,
                  stop: threading.Event | None = None) -> dict:
    """Extract one shard into the store and commit it; a committed shard is skipped (returns its record).

    on_batch(n) is called after each batch (progress bars). attempt is recorded in the commit record (the
    orchestrator's retry count). When `stop` is set, the shard ends after its current batch with
    `Interrupted`, uncommitted. Returns the shard's commit record.
    """
    store = store or FeatureStore.open(config.out, config.storage_options)
    done = store.commit_record(shard.name)  # one read of this shard's record, not a listing of all
    if done is not None:
        return done | {"skipped": True}
    runner = get_runner(config, device)
    out_dtype = torch.float16 if config.dtype == "float16" else torch.float32
    started = time.time()
    t0 = time.perf_counter()
    writer = store.writer(shard)
    background = _BackgroundWriter(writer.write)
    bad: list[dict] = []
    n_valid = 0
    # where the time goes: blocked on input (decode-bound), decoding on the device, blocked on the writer
    # (storage-bound); the rest is forward + reductions (compute-bound)
    input_wait = device_decode = 0.0
    decoder = runner.decoder
    batches = iter(read_shard(shard, runner.model.transform if decoder is None else None, config.batch_size,
                              config.resolved_workers(), config.storage_options,
                              pin_memory=runner.device.type == "cuda" and decoder is None))
    try:
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted(f"stopped during shard {shard.name}; it was not committed and runs again next time")
            t_wait = time.perf_counter()
            batch = next(batches, None)
            input_wait += time.perf_counter() - t_wait
            if batch is None:
                break
            if decoder is not None:
                t_dec = time.perf_counter()
                batch = decoder(batch)
                device_decode += time.perf_counter() - t_dec
            feats = runner.extractor(batch.images)
            valid = batch.valid.numpy().copy()
            n_valid += int(valid.sum())
            bad += [{"key": k, "reason": r} for k, r in batch.errors.items()]
            background.put(int(batch.index[0]), list(batch.keys), valid, feats, out_dtype)
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        batches.close()  # stops the decode workers now, also when the shard ends in an error
        t_flush = time.perf_counter()
        background.close()
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
        "batch_size": config.batch_size,
        "attempts": attempt,
        "stages": stages,
        "stats": stats,
        "source": source_of(shard, config.storage_options),  # what the rows came from (see plan)
    }
    return writer.commit(record)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)

