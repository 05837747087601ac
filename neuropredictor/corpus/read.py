"""Reading one shard as batches, in tar order, as named stages (each a small generator):

    WorkerShare     which samples this DataLoader worker decodes (whole batches: w, w+n, w+2n, ...)
    sample_range    a shard with an offsets sidecar: one ranged read of exactly this worker's batch
    tar_samples     members grouped into samples by key; image bytes read only for this worker's samples
    prepare         decode + preprocess one sample (or, for the device, `for_device`), or the reason it cannot be
    batched         consecutive prepared samples -> Batch

`read_shard` runs the stages in DataLoader workers and checks that batches arrive in order. A shard's
bytes are read once whatever the number of workers: by ranges where its sidecar gives the offsets
(`corpus.offsets`), else by one worker, or from a local copy fetched once when several workers share a
remote shard.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from neuropredictor import fs as fsx
from neuropredictor.corpus.access import access_error, connect
from neuropredictor.corpus.decode import (
    ImageError,
    MachineError,
    decode_pil,
    decoded,
    for_device,
    image_bytes,
    transformed,
)
from neuropredictor.corpus.make import IMAGE_EXTENSIONS
from neuropredictor.corpus.offsets import Offsets, offsets_path, read_offsets
from neuropredictor.corpus.tar import members, open_tar, printable_key, short, tar_error
from neuropredictor.errors import CorpusError
from neuropredictor.shard import Shard

_DUMMY_SIZE = (64, 64)
# what to do when a shard no longer holds the samples its folder's index.json counted
_STALE = ("the shard was replaced after its folder was indexed. Index the folder again (`neuropredictor shards "
          "index FOLDER`, or index_shards), then extract with overwrite=True: the store was planned with the old "
          "count.")

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Consecutive samples of one shard, decoded and transformed (or, read with transform=None, for the device)."""

    index: torch.Tensor  # int64 (B,): positions of these samples within the shard (0-based, tar order)
    keys: list[str]  # the samples' __key__
    images: torch.Tensor | None  # (B, C, H, W) output of `transform`; zeros for invalid samples
    valid: torch.Tensor  # bool (B,)
    errors: dict[str, str] = field(default_factory=dict)  # key -> reason, for invalid samples
    # read with transform=None: per sample, a JPEG's bytes for the device's decoder or the image decoded
    # already (uint8 (H, W, 3)); None for invalid samples (`decode.for_device`)
    data: list[bytes | np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """Pinned copy of the tensors; DataLoader(pin_memory=True) calls this for custom batch types."""
        return Batch(index=self.index.pin_memory(), keys=self.keys,
                     images=self.images.pin_memory() if self.images is not None else None,
                     valid=self.valid.pin_memory(), errors=self.errors, data=self.data)


@dataclass
class Sample:
    """One sample of a shard: its position, key, image bytes (None if not read or absent) and fields."""

    index: int
    key: str
    data: bytes | None = None
    fields: list[str] = field(default_factory=list)
    problem: str | None = None  # why the sample is invalid whatever its image (a bad name, a repeated member)


# --------------------------------------------------------------------------------------------------
# stages


def tar_samples(tf: tarfile.TarFile, url: str, count: int, wanted: Callable[[int], bool], first: int = 0,
                check_end: bool = True, ranged: bool = False) -> Iterator[Sample]:
    """The samples of a tar in order (consecutive members with one key, as WebDataset groups them),
    numbered from `first` (a range of a shard starts past 0). Image bytes are read only for samples
    `wanted(index)` accepts, so a worker skips the others' data. More or fewer samples than `count`
    raise CorpusError: their rows would land in another shard's place. `ranged`: the tar is the bytes that
    the shard's offsets file gives samples first..first+count-1 (not the whole shard its index counted)."""
    where = (f"the bytes its offsets file gives samples {first}..{first + count - 1} hold", "") if ranged else \
        (f"shard {url} has", f" but the corpus index says {count}: {_STALE}")
    cur: Sample | None = None
    raw = None  # the current sample's key as read (grouping compares it, not the printable one)
    seen: dict[str, int] = {}  # key -> the sample that used it first
    n = 0
    for ti, key, fld in members(tf, url, check_end):
        if cur is None or key != raw:
            if cur is not None:
                yield cur
            if n >= count:  # stop before anything past the shard's rows exists
                raise CorpusError(f"{where[0]} more than {count} samples{where[1]}")
            shown, problem = printable_key(key)
            if problem is None and key in seen:
                problem = f"the key {key!r} is also sample {seen[key]} of this shard: keys must be unique"
            seen.setdefault(key, first + n)
            cur, raw = Sample(first + n, shown, problem=problem), key
            n += 1
        elif fld in cur.fields and cur.problem is None:
            # WebDataset would keep one of the two and lose the other without a word
            cur.problem = short(f"the member {cur.key}.{fld} appears twice in a row in the shard: two images "
                                "under one key; give each its own key")
        elif fld in IMAGE_EXTENSIONS and cur.problem is None and (
                other := [f for f in cur.fields if f in IMAGE_EXTENSIONS]):
            cur.problem = short(f"two images under the key {cur.key} ({other[0]}, {fld}): which one is the stimulus "
                                "is not known; give each its own key, or name a field that is not a stimulus "
                                f"otherwise (a mask as {cur.key}.mask.png)")
        if fld in IMAGE_EXTENSIONS and not ti.isreg() and cur.problem is None:
            # tar links have no data of their own, and the member they name is not kept while streaming
            cur.problem = short(f"the member {cur.key}.{fld} is a link in the shard (to {ti.linkname}), not a "
                                "file: pack the image itself (`neuropredictor shards make` does)")
        cur.fields.append(fld)
        if cur.data is None and fld in IMAGE_EXTENSIONS and ti.isreg() and wanted(cur.index):
            fobj = tf.extractfile(ti)
            cur.data = fobj.read() if fobj is not None else b""
    if n != count:
        raise CorpusError(f"{where[0]} {n} samples" + (where[1] or f", not {count}"))
    if cur is not None:
        yield cur


@dataclass(frozen=True)
class WorkerShare:
    """The samples one of n DataLoader workers handles: whole batches w, w+n, w+2n, ... The DataLoader
    takes one batch from each worker in turn, which is global order."""

    worker: int
    workers: int
    batch_size: int

    @classmethod
    def current(cls, batch_size: int) -> WorkerShare:
        info = get_worker_info()
        return cls(info.id, info.num_workers, batch_size) if info is not None else cls(0, 1, batch_size)

    def owns(self, index: int) -> bool:
        return (index // self.batch_size) % self.workers == self.worker

    def batches(self, count: int) -> Iterator[tuple[int, int]]:
        """(first, last) sample of each batch this worker owns, of a shard of `count` samples."""
        for first in range(self.worker * self.batch_size, count, self.workers * self.batch_size):
            yield first, min(first + self.batch_size, count)


def sample_range(fs: Any, path: str, url: str, offsets: Offsets, first: int, last: int) -> list[Sample]:
    """Samples first..last-1 of a shard that has an offsets sidecar, from one ranged read of exactly their
    bytes. Their keys are checked against the sidecar's, so a shard changed behind it is refused, never
    misread; the range that ends the shard also checks the end-of-archive marker."""
    start, end = offsets.span(first, last)
    data = fs.cat_file(path, start=start, end=end)
    try:
        if len(data) != end - start:
            raise CorpusError(f"bytes {start}..{end} read as {len(data)} bytes")
        with open_tar(io.BytesIO(data)) as tf:
            samples = list(tar_samples(tf, url, last - first, lambda _i: True, first, check_end=last == offsets.count,
                                       ranged=True))
        keys = [s.key for s in samples]
        if keys != list(offsets.keys[first:last]):
            i = next(i for i, (a, b) in enumerate(zip(keys, offsets.keys[first:last])) if a != b)
            raise CorpusError(f"sample {first + i} is {keys[i]!r} where the offsets file says {offsets.keys[first + i]!r}")
    except (CorpusError, tarfile.TarError) as exc:
        raise CorpusError(
            f"shard {url} does not match its offsets file {offsets_path(url)} ({short(str(exc), 240)}): the shard "
            "changed, or was damaged, after the offsets were written. Re-create or re-upload it, run "
            "`neuropredictor shards index` on its folder, or delete the offsets file to read the shard whole."
        ) from exc
    return samples


def prepare(sample: Sample, transform: Callable[[Image.Image], torch.Tensor] | None,
            shape: tuple[int, ...]) -> tuple[torch.Tensor | bytes | np.ndarray | None, str | None]:
    """(image tensor, None) or (None, reason). Without a transform, what the device decoder takes instead
    of the tensor (`decode.for_device`: a JPEG's bytes, or the image decoded here)."""
    if sample.problem is not None:
        return None, sample.problem
    try:
        data = image_bytes(sample.data, sample.fields)
        if transform is None:
            return for_device(data), None
        return transformed(transform, decoded(decode_pil, data), shape), None
    except ImageError as exc:
        return None, str(exc)
    except MachineError as exc:
        raise MachineError(f"sample {sample.key}: {exc}") from exc


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# --------------------------------------------------------------------------------------------------
# the DataLoader's dataset


@dataclass
class _Failure:
    """Sent from a worker instead of a batch: the main process raises it as a clean CorpusError."""

    message: str


def _identity(x: Any) -> Any:
    return x


class _ShardBatches(IterableDataset):
    """The stages for one shard, in whichever process the DataLoader runs this worker."""

    def __init__(self, shard: Shard, source: str, offsets: Offsets | None,
                 transform: Callable[[Image.Image], torch.Tensor] | None, batch_size: int,
                 shape: tuple[int, ...], dtype: torch.dtype, storage_options: Mapping | None) -> None:
        self.shard, self.source, self.offsets = shard, source, offsets  # source: the shard's URL or a local copy
        self.transform, self.batch_size = transform, batch_size
        self.shape, self.dtype, self.storage_options = shape, dtype, storage_options

    def __iter__(self) -> Iterator[Batch | _Failure]:
        try:
            yield from self._batches(WorkerShare.current(self.batch_size))
        except CorpusError as exc:
            yield _Failure(str(exc))
        except tarfile.TarError as exc:
            yield _Failure(tar_error(self.shard.url, exc))
        except MachineError as exc:
            yield _Failure(f"out of memory reading shard {self.shard.url}: {exc}")
        except Exception as exc:
            yield _Failure(str(access_error(self.shard.url, exc, "shard")))

    def _batches(self, share: WorkerShare) -> Iterator[Batch]:
        # A fresh filesystem per worker: fsspec's async filesystems (s3fs) are not fork-safe.
        local_copy = self.source != self.shard.url
        fs, path = connect(self.source, None if local_copy else self.storage_options)
        if self.offsets is not None:
            for first, last in share.batches(self.shard.count):
                yield self._build(sample_range(fs, path, self.shard.url, self.offsets, first, last))
            return
        with fs.open(path, "rb") as f, open_tar(f) as tf:
            mine = (s for s in tar_samples(tf, self.shard.url, self.shard.count, share.owns) if share.owns(s.index))
            for group in batched(mine, self.batch_size):
                yield self._build(group)

    def _build(self, samples: list[Sample]) -> Batch:
        n = len(samples)
        encoded_only = self.transform is None  # for the device: JPEGs decoded there (`for_device`)
        images = None if encoded_only else torch.zeros((n, *self.shape), dtype=self.dtype)
        data: list[bytes | np.ndarray | None] = [None] * n
        valid = torch.zeros(n, dtype=torch.bool)
        errors: dict[str, str] = {}
        for j, sample in enumerate(samples):
            image, reason = prepare(sample, self.transform, self.shape)
            if reason is not None:
                errors[sample.key] = reason
                continue
            if images is not None:
                images[j] = image
            else:
                data[j] = image
            valid[j] = True
        return Batch(index=torch.tensor([s.index for s in samples], dtype=torch.int64), keys=[s.key for s in samples],
                     images=images, valid=valid, errors=errors, data=data if encoded_only else None)


def _decode_worker_init(_worker_id: int) -> None:
    """A decode worker (a fork of the run's process) is stopped by its parent, not by signals meant for it:

    - Ctrl-C, and a Prefect worker cancelling a run, signal the whole process group (SIGINT, SIGTERM). A
      decode worker that died of it first made the run see "DataLoader worker exited unexpectedly", record
      the shard as failed and retry it, instead of stopping as asked. So it leaves the group: the parent
      stops its workers as it stops (they also exit when it dies).
    - A signal sent to the worker itself still works: the parent's exit terminates workers still running
      (multiprocessing's SIGTERM, e.g. after a second Ctrl-C cut the loader's own shutdown short); one that
      ignored it held the process at exit forever.
    - It inherits the parent's thread-exit hooks, e.g. those of Prefect's log and event services once a flow
      has run in this process. They assume threads the fork does not have and fail at the worker's exit
      (exit code 1, the batches lost): the worker is not the parent, so drop them."""
    import signal
    import threading

    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    # a terminal's, and a direct Ctrl-C, are never the worker's to act on; out of the terminal's foreground
    # group, a write to it (a PIL warning) would stop the worker (SIGTTOU, with `stty tostop`) and hang the run
    for name in ("SIGINT", "SIGHUP", "SIGTTOU", "SIGTTIN"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    getattr(threading, "_threading_atexits", []).clear()


def read_shard(shard: Shard, transform: Callable[[Image.Image], torch.Tensor] | None, batch_size: int,
               num_workers: int = 0, storage_options: Mapping | None = None,
               pin_memory: bool = False) -> Iterator[Batch]:
    """Yield the shard's samples in tar order as Batches of `batch_size` (the last may be smaller).

    Decoding (PIL, RGB) and `transform` run in `num_workers` DataLoader worker processes (in this
    process when 0); `transform` must be picklable and give a fixed-shape tensor. A sample that cannot
    be decoded or transformed is kept with valid=False, a zero image and a reason in `errors`. An
    unreadable shard, or one whose sample count differs from `shard.count`, raises CorpusError.

    With `transform=None`, batches carry in `data` (images None) what
    :class:`neuropredictor.device_decode.DeviceDecoder` decodes: the bytes of JPEGs it may decode as
    stored, the pixels of any other image decoded in the workers (`decode.for_device`); samples that
    cannot be decoded are invalid already.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    # The shape of invalid samples' zero images comes from one run of the transform on a plain image;
    # doing it here (not in each worker) turns a broken transform into one clear error before any I/O.
    try:
        ref = transform(Image.new("RGB", _DUMMY_SIZE, (128, 128, 128))) if transform is not None else torch.zeros(0)
    except Exception as exc:
        raise ValueError(
            f"transform failed on a {_DUMMY_SIZE[0]}x{_DUMMY_SIZE[1]} RGB test image: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"transform must return a torch.Tensor, got {type(ref).__name__}")

    # Workers beyond the number of batches would only re-read the tar: don't start them.
    workers = min(num_workers, -(-shard.count // batch_size))
    with _source(shard, workers, storage_options) as (source, offsets):
        dataset = _ShardBatches(shard, source, offsets, transform, batch_size, tuple(ref.shape), ref.dtype,
                                storage_options)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                            pin_memory=pin_memory,  # batch_size=None: the dataset yields batches
                            worker_init_fn=_decode_worker_init)
        expected = 0
        for item in loader:
            if isinstance(item, _Failure):
                raise CorpusError(item.message)
            # Order is what the caller's row arithmetic relies on: check it rather than assume it.
            if len(item) == 0 or int(item.index[0]) != expected:
                raise RuntimeError(f"internal error: batch starting at {int(item.index[0]) if len(item) else None} "
                                   f"arrived where {expected} was expected (shard {shard.url})")
            expected += len(item)
            yield item


_hinted: set[str] = set()  # folders already told about `shards index` (once per folder and process)


@contextlib.contextmanager
def _source(shard: Shard, workers: int, storage_options: Mapping | None) -> Iterator[tuple[str, Offsets | None]]:
    """(where the workers read the shard, its offsets or None), so that its bytes are read once: by ranges
    when its sidecar gives the offsets; else whole, by one reader, or (several workers, remote shard) from a
    local copy fetched once here and removed afterwards."""
    # this process's cached filesystem (the workers open fresh ones): no new client per shard
    fs, path = connect(shard.url, storage_options, fresh=False)
    offsets = read_offsets(fs, path, shard.size, shard.count)
    if offsets is not None or workers <= 1 or fsx.is_local(fs):
        yield shard.url, offsets
        return
    folder = fsx.parent(shard.url)
    if folder not in _hinted:
        _hinted.add(folder)
        log.warning("the shards in %s have no offsets files: each is copied to local disk before its %d "
                    "workers read it, and a plan reads it to count it; `neuropredictor shards index %s` (once) "
                    "lets later runs read each shard once, by ranges", folder, workers, folder)
    fd, local = tempfile.mkstemp(prefix=f"neuropredictor-{shard.name}-", suffix=".tar")
    os.close(fd)
    try:
        try:
            fs.get_file(path, local, **fsx.in_parts(fs))
        except Exception as exc:
            raise access_error(shard.url, exc, "shard") from exc
        yield local, None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(local)
