"""The store's layout: object names, chunk planning, codecs and the checks of a plan.

```
<url>/
  zarr.json                      root group (consolidated metadata after finalize)
  keys                           (N,) string, the samples' __key__          dims ("stimulus",)
  valid                          (N,) bool, False = not decoded / not written  dims ("stimulus",)
  features/<layer>               (N, *layer_shape) float32|float16, NaN fill
                                 dims ("stimulus", "<layer>.dim_1", ...)
  manifest.json                  the run record (neuropredictor.manifest)
  _status/<shard>.json           commit record, written after the shard's data
  _status/<shard>.failed.json    last failure of a shard (does not count as committed)
  _staging/<shard>/<attempt>/<array>/<chunk>.npy   a shard attempt's rows of chunks shared with a neighbour
```
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import statistics
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from neuropredictor.errors import StoreError
from neuropredictor.shard import Shard

MIN_CHUNK_BYTES = 2**20  # chunks of unequal shards are made smaller, down to this (plan_chunk_rows)
DEFAULT_CHUNK_BYTES = 64 * 2**20  # uncompressed bytes per chunk: big enough for object-store throughput
STIMULUS = "stimulus"  # the sample axis, named the same in every array
MANIFEST = "manifest.json"
PLAN = "_plan.json"  # the plan, written once per generation: what a damaged manifest is rebuilt from
GENERATION = "_generation.json"  # {generation, config_hash}: written last when a store is planned
STATUS_DIR = "_status"
STAGING_DIR = "_staging"
LOCKS_DIR = "_locks"
CLAIMS_DIR = f"{LOCKS_DIR}/shards"  # a lease per shard being extracted
RUNS_DIR = "_runs"
FEATURES = "features"
KEYS = "keys"
VALID = "valid"
DTYPES = ("float32", "float16")
COMPRESSIONS = ("zstd", "blosc", "gzip", "none")
KEY_ROW_BYTES = 64  # a guess at one key's stored size, only used to size the keys' chunks
# Everything a store consists of: what replacing one deletes (anything else in the folder is left alone).
STORE_ENTRIES = ("zarr.json", FEATURES, KEYS, VALID, MANIFEST, PLAN, GENERATION, STATUS_DIR, STAGING_DIR, RUNS_DIR)


@dataclass(frozen=True)
class LayerSpec:
    """One recorded layer: its module name, per-sample shape after reduction, and the reduction."""

    name: str
    shape: tuple[int, ...]
    reduction: str

    def __post_init__(self) -> None:
        # Shapes arrive as lists from JSON and as torch.Size from the extractor; store plain ints.
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


class RowDigest:
    """A checksum of rows as the arrays hold them (numbers by their bytes, strings by their UTF-8), so rows
    read back from zarr give the digest the writer computed, and damage (a flipped byte, a lost chunk) shows."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)

    def update(self, rows: Any) -> None:
        rows = np.asarray(rows)
        if rows.dtype.kind in ("U", "T", "O", "S"):
            for item in rows.reshape(-1).tolist():
                data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
                self._hash.update(len(data).to_bytes(4, "little") + data)
        else:
            self._hash.update(np.ascontiguousarray(rows).tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def feature_path(layer: str) -> str:
    return f"{FEATURES}/{layer}"


def dim_names(layer: LayerSpec) -> tuple[str, ...]:
    # Per-layer names: two layers with different widths must not claim one dimension in xarray.
    return (STIMULUS, *(f"{layer.name}.dim_{i}" for i in range(1, len(layer.shape) + 1)))


def safe_name(name: str) -> str:
    """A shard name as one path segment (it names objects under _status/ and _staging/)."""
    safe = quote(name, safe="-_.=+@,")
    return safe.replace(".", "%2E") if safe in (".", "..") else safe


# ---------------------------------------------------------------------------------------------
# chunk planning


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i) if d <= limit)


def plan_chunk_rows(counts: Sequence[int], row_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk (along the sample axis) for an array whose rows take row_bytes each.

    Shards of equal size (all but the last): the largest divisor of that size whose chunk fits in
    chunk_bytes, so chunk boundaries fall on shard boundaries and no chunk is shared. If that
    divisor is tiny (a prime shard size with big rows would mean one object per row), and for
    unequal shards (img2dataset's, other tools'): chunks straddle shard ends, and each shard stages its
    two boundary chunks for finalize to merge, so a chunk holds a sixteenth of the median shard (about
    an eighth of the rows staged; at the median size, nearly all were), but at least MIN_CHUNK_BYTES
    (object stores want big objects; rows as small as keys stay in few chunks), and what fits in
    chunk_bytes.
    """
    limit = max(1, int(chunk_bytes) // max(1, int(row_bytes)))
    counts = [int(c) for c in counts if int(c) > 0]  # empty shards own no rows and share no chunk
    if not counts:
        return 1
    head = counts[:-1]
    if len(set(head)) <= 1:
        size = head[0] if head else counts[-1]
        best = _largest_divisor_at_most(size, limit)
        if best * 4 >= min(limit, size):
            return best
    median = int(statistics.median(counts))
    return max(1, min(limit, median, max(median // 16, -(-MIN_CHUNK_BYTES // max(1, int(row_bytes))))))


def plan_all_chunk_rows(shards: Sequence[Shard], layers: Sequence[LayerSpec], dtype: str,
                        chunk_bytes: int) -> dict[str, int]:
    """Rows per chunk of every array of a store, by array path."""
    counts = [int(s.count) for s in shards]
    itemsize = np.dtype(dtype).itemsize
    rows = {feature_path(lay.name): plan_chunk_rows(counts, itemsize * int(np.prod(lay.shape)), chunk_bytes)
            for lay in layers}
    rows[KEYS] = plan_chunk_rows(counts, KEY_ROW_BYTES, chunk_bytes)
    rows[VALID] = plan_chunk_rows(counts, 1, chunk_bytes)
    return rows


def boundary_chunks(offset: int, count: int, chunk_rows: int, total: int) -> list[int]:
    """Chunks that hold rows of this shard and rows of another one (only its first and last can)."""
    if count <= 0:
        return []
    end = offset + count
    return [k for k in sorted({offset // chunk_rows, (end - 1) // chunk_rows})
            if k * chunk_rows < offset or min((k + 1) * chunk_rows, total) > end]


def row_nbytes(arr: Any) -> int:
    """Uncompressed bytes of one row of a zarr array (strings: the sizing guess)."""
    dt = np.dtype(arr.dtype)
    per_row = int(np.prod(arr.shape[1:])) if len(arr.shape) > 1 else 1
    return per_row * (KEY_ROW_BYTES if dt.kind in ("T", "O", "U") else dt.itemsize)


def local_root(arr: Any) -> str | None:
    """The folder of arr's store when it is on local disk: what is written there is synced before a record vouches
    for it (fs.sync_local); None on object stores, whose writes are durable once answered."""
    return str(arr.store.root) if isinstance(arr.store, zarr.storage.LocalStore) else None


def local_chunk_files(arr: Any, chunks: Iterable[int]) -> list[str]:
    """The files of these row chunks of arr when its store is on local disk (local_root); else none."""
    root = local_root(arr)
    rest = (0,) * (arr.ndim - 1)  # chunks span every dimension but the rows
    return [] if root is None else [f"{root}/{arr.path}/{arr.metadata.encode_chunk_key((k, *rest))}" for k in chunks]


# ---------------------------------------------------------------------------------------------
# codecs


def parse_compression(compression: str) -> tuple[str, int | None]:
    name, _, level = str(compression).partition(":")
    name = name.strip().lower()
    if name not in COMPRESSIONS or (level and (name == "none" or not level.strip().isdigit())):
        raise StoreError(f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)} "
                         "(optionally with a level, e.g. zstd:5)")
    top = _TOP_LEVEL.get(name, 0)
    if level and int(level) > top:
        raise StoreError(f"compression level {int(level)} is out of range for {name}: use {name}:0 to {name}:{top}")
    return name, int(level) if level else None


_TOP_LEVEL = {"zstd": 22, "blosc": 9, "gzip": 9}  # the codecs' highest levels


def compressors(compression: str, for_features: bool) -> Any:
    name, level = parse_compression(compression)
    if name == "none":
        return None
    if name == "zstd" or not for_features:
        # keys and valid are tiny next to the features; zstd suits strings and bools alike
        return ZstdCodec(level=3 if level is None or name != "zstd" else level)
    if name == "blosc":
        # byte-shuffle groups the exponent bytes of neighbouring floats: much better ratios on activations
        return BloscCodec(cname="zstd", clevel=3 if level is None else level, shuffle="shuffle")
    return GzipCodec(level=5 if level is None else level)


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence zarr's notes about our non-zarr objects (manifest.json, _status/) and v3 consolidation.

    Both are expected here: the run record lives next to the arrays by design, and consolidated
    metadata is written once, at finalize, for xarray's benefit.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*not recognized as a component of a Zarr hierarchy")
        warnings.filterwarnings("ignore", message=r"Consolidated metadata is currently not part")
        yield


# ---------------------------------------------------------------------------------------------
# checks


def check_plan(shards: Sequence[Shard], layers: Sequence[LayerSpec], dtype: str, compression: str,
               chunk_bytes: int) -> None:
    """Raise StoreError for a plan the store cannot hold (before anything is written)."""
    if dtype not in DTYPES:
        raise StoreError(f"unsupported store dtype {dtype!r}: use one of {', '.join(DTYPES)} "
                         "(bfloat16 has no zarr dtype; activations are cast before writing)")
    parse_compression(compression)
    if int(chunk_bytes) < 1:
        raise StoreError(f"chunk_bytes must be positive, not {chunk_bytes}")
    if not layers:
        raise StoreError("no layers to store")
    names = [lay.name for lay in layers]
    for name in names:
        if not name or "/" in name or name.startswith("__") or name in (".", ".."):
            raise StoreError(f"layer name {name!r} cannot be a zarr array name (empty, '/', leading '__')")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StoreError(f"duplicate layer names: {', '.join(dupes)}")
    for lay in layers:
        if any(d < 1 for d in lay.shape):
            raise StoreError(f"layer {lay.name!r}: shape {lay.shape} has an empty dimension")
    seen: set[str] = set()
    expected = 0
    for s in shards:
        if s.name in seen:
            raise StoreError(f"shard name {s.name!r} appears twice in the plan")
        seen.add(s.name)
        if int(s.count) < 0 or int(s.offset) != expected:
            raise StoreError(f"shard {s.name!r}: offset {s.offset} / count {s.count} break the plan "
                             f"(expected offset {expected}; shards must tile the rows in order)")
        expected += int(s.count)
