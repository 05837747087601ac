"""The data path of one run, as three library calls (the Prefect flows are thin wrappers over them):

    validate(config)              model loads, layers resolve, corpus reachable: before anything is written
    plan(config)                  validate, then create the Zarr store (or reopen it to resume)
    extract_shard(config, shard)  read -> decode/preprocess -> forward + reduce -> write rows -> commit
    finalize(config)              merge commit records into manifest.json, consolidate metadata

`run(config)` does all three in this process, shard after shard; re-running it resumes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from neuropredictor.corpus import Shard, list_shards, read_shard
from neuropredictor.errors import NeuroPredictorError, StoreError
from neuropredictor.extractor import Extractor
from neuropredictor.models import LoadedModel, load_model
from neuropredictor.store import FeatureStore, LayerSpec

if TYPE_CHECKING:  # imported when used: torchvision's decoders cost start-up time nobody else needs
    from neuropredictor.device_decode import DeviceDecoder


class ExtractConfig(BaseModel):
    """Everything one extraction run needs. Fields that change the numbers form the store's identity
    (see `identity`); the others (batch size, workers, device) may differ between runs that resume."""

    model_config = ConfigDict(extra="forbid")

    corpus: str | list[str] = Field(description="WebDataset shards: a directory, a brace pattern "
                                    "(shards/train-{000000..000099}.tar), a URL (s3://...), or a list of them.")
    model: str = Field(description="Model spec SOURCE:NAME[@TAG], e.g. timm:resnet50, torchvision:alexnet, "
                       "openclip:ViT-B-32@laion2b_s34b_b79k, clip:ViT-B-32, hf:ORG/NAME, custom:module:factory.")
    layers: list[str] = Field(description="Layer names or globs, e.g. `layer3`, `layer4` or `blocks.*` (a `*` "
                              "matches within one dotted segment); list them with `neuropredictor layers SPEC`.")
    out: str = Field(description="Output Zarr store URL (local path or s3://bucket/prefix).")
    reduce: str = Field("full", description="One reduction for every layer (full, flatten, avgpool, cls, "
                        "pool:K, srp:D), or per layer: 'layer3=pool:2,layer4=avgpool'.")
    pretrained: bool = Field(True, description="Use the source's pretrained weights; False gives random weights.")
    weights: str | None = Field(None, description="Local checkpoint to load (safetensors or torch state dict).")
    dtype: Literal["float32", "float16"] = Field("float32", description="Dtype of the stored features.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast precision of the forward pass.")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    num_workers: int | None = Field(None, ge=0, description="DataLoader decode workers per device "
                                    "(default: the machine's cores, up to 8).")
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1'...")
    channels_last: bool = Field(False, description="Run conv nets in channels_last memory format.")
    compile: bool = Field(False, description="torch.compile the model (one compilation per replica, worth it "
                          "for long runs on a GPU; numbers equal eager within float rounding).")
    decode: Literal["cpu", "device"] = Field("cpu", description="Where images are decoded and preprocessed: "
                                             "'cpu' (PIL in the DataLoader workers) or 'device' (JPEGs decoded in "
                                             "batches by nvJPEG on the GPU, preprocessing as tensor ops there), for "
                                             "when CPU decoding is the bottleneck.")
    compression: str = Field("zstd", description="Zarr compression: zstd, zstd:LEVEL, blosc, gzip, none.")
    srp_seed: int = Field(0, description="Seed of the sparse random projections (srp:D).")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec storage options (e.g. "
                                                   "endpoint_url); never written to the manifest.")
    overwrite: bool = Field(False, description="Replace an existing store made with another configuration.")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_workers(self) -> int:
        return self.num_workers if self.num_workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass
class Runner:
    """One model replica on one device, with its hooks in place; reused for every shard of a run."""

    model: LoadedModel
    extractor: Extractor
    device: torch.device
    decoder: DeviceDecoder | None = None  # decode="device": decoding and preprocessing on `device`

    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(p.name, p.out_shape, str(p.reduction)) for p in self.extractor.plan.values()]


_RUNNERS: dict[tuple, Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def get_runner(config: ExtractConfig, device: str | torch.device | None = None) -> Runner:
    """The process's replica for this model/layers/device, loaded on first use (never per shard)."""
    dev = torch.device(device) if device is not None else config.resolved_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" share one replica
    key = (config.model, config.pretrained, config.weights, tuple(config.layers), config.reduce,
           config.precision, config.channels_last, config.srp_seed, config.compile, config.decode, str(dev))
    with _RUNNERS_LOCK:
        if key not in _RUNNERS:
            model = load_model(config.model, pretrained=config.pretrained, weights=config.weights)
            decoder = None
            if config.decode == "device":
                from neuropredictor.device_decode import DeviceDecoder

                decoder = DeviceDecoder(model.transform, dev, model.input_size)
            ex = Extractor(model, config.layers, reduce=config.reduce, device=dev, precision=config.precision,
                           channels_last=config.channels_last, srp_seed=config.srp_seed, compile=config.compile)
            _RUNNERS[key] = Runner(model, ex.__enter__(), dev, decoder)
        return _RUNNERS[key]


def identity(config: ExtractConfig, runner: Runner) -> dict:
    """The fields that determine the stored numbers: a store made with other values is another run."""
    return {
        "model": config.model,
        "weights": runner.model.weights,
        "layers": runner.extractor.layers,
        "reductions": {p.name: str(p.reduction) for p in runner.extractor.plan.values()},
        "input_size": list(runner.model.input_size),
        "precision": config.precision,
        "decode": config.decode,  # nvJPEG + tensor resizing round differently from PIL
        "dtype": config.dtype,
        "srp_seed": config.srp_seed,
    }


def validate(config: ExtractConfig) -> list[Shard]:
    """Everything that can be checked before a store is touched: the model loads, the layers resolve,
    the reductions fit, the corpus is reachable and non-empty. Returns the corpus's shards."""
    get_runner(config)
    shards = list_shards(config.corpus, config.storage_options)
    check_output(config.out, config.storage_options)
    return shards


def check_output(url: str, storage_options: dict | None = None) -> None:
    """Fail early, writing nothing, when the output cannot be created: its nearest existing ancestor must
    be a directory (or, on object stores, the bucket must exist)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        probe = path.rstrip("/")
        for _ in range(64):  # bounded walk up to the nearest existing ancestor
            if fs.exists(probe):
                if not fs.isdir(probe):
                    raise StoreError(f"cannot create the output store {url!r}: {probe!r} is a file, not a folder. "
                                     "Choose another --out.")
                return
            parent = fs._parent(probe)
            if not parent or parent == probe:
                break
            probe = parent
        raise StoreError(f"cannot create the output store {url!r}: its bucket {probe!r} does not exist")
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot reach the output store {url!r}: {type(exc).__name__}: {exc}") from exc


def plan(config: ExtractConfig, shards: list[Shard] | None = None) -> FeatureStore:
    """Validate, then create the store (or reopen it, to resume).

    Fails fast with a NeuroPredictorError on an unknown model or layer, an unreachable or empty corpus,
    or an output that exists with a different configuration (nothing is written then).
    """
    shards = shards if shards is not None else validate(config)
    runner = get_runner(config)
    store = FeatureStore.create(
        config.out, shards, runner.layer_specs(), identity(config, runner), dtype=config.dtype,
        compression=config.compression, storage_options=config.storage_options, overwrite=config.overwrite,
    )
    done = store.committed()  # one listing, not one request per shard
    committed = [s for s in store.shards if s.name in done]
    _emit("planned", rows=store.rows, committed_rows=sum(s.count for s in committed), shards=len(store.shards),
          committed_shards=len(committed))
    return store


_LISTENERS: list[Callable[[str, dict], None]] = []


@contextlib.contextmanager
def progress_listener(fn: Callable[[str, dict], None]) -> Iterator[None]:
    """Call fn(event, data) for the progress events of this process's runs, for progress bars that sit
    outside the code running the shards (the CLI around the Prefect flow). Events:
    "planned" {rows, committed_rows, shards, committed_shards}, "batch" {images}, "shard" {name, record}."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


def _emit(event: str, **data: Any) -> None:
    for fn in list(_LISTENERS):
        fn(event, data)


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


def extract_shard(config: ExtractConfig, shard: Shard, store: FeatureStore | None = None,
                  device: str | torch.device | None = None,
                  on_batch: Callable[[int], None] | None = None, attempt: int = 1) -> dict:
    """Extract one shard into the store and commit it; a committed shard is skipped (returns its record).

    on_batch(n) is called after each batch (progress bars), as are the progress listeners. attempt is
    recorded in the commit record (the orchestrator's retry count). Returns the shard's commit record.
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
            _emit("batch", images=len(batch))
    finally:
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
    }
    store.commit(shard, record)
    _emit("shard", name=shard.name, record=record)
    return record


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def finalize(config: ExtractConfig, store: FeatureStore | None = None) -> dict:
    """Merge commit records into manifest.json and consolidate metadata; returns the manifest."""
    store = store or FeatureStore.open(config.out, config.storage_options)
    return store.finalize()


def run(config: ExtractConfig) -> dict:
    """plan -> every shard in turn (committed ones skipped) -> finalize, in this process, without Prefect
    (notebooks). A shard that fails is recorded as failed and the others still run; the error is raised at
    the end, after finalize, naming the failed shards. Re-running resumes."""
    store = plan(config)
    failed: dict[str, str] = {}
    for shard in store.shards:
        try:
            extract_shard(config, shard, store=store)
        except Exception as exc:  # one bad shard must not cost the others; it is re-run next time
            failed[shard.name] = f"{type(exc).__name__}: {exc}"
            store.record_failure(shard, failed[shard.name], attempts=1)
    manifest = store.finalize()
    if failed:
        raise NeuroPredictorError(failure_message(failed))
    return manifest


def failure_message(failed: dict[str, str]) -> str:
    """What a run whose shards `failed` (name -> error) tells the user: which, why, and how to resume."""
    return (f"{len(failed)} shard(s) failed after their retries: {', '.join(sorted(failed))}. The other shards "
            "are stored and committed. Fix the cause and run the same command again: only these shards run.\n"
            + "\n".join(f"  {k}: {v}" for k, v in sorted(failed.items())))
