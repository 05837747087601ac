"""Zarr v3 layout of one extraction run, on any fsspec store (local disk, s3://, ...).

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
  _staging/<shard>/<array>/<chunk>.npy   a shard's rows of chunks it shares with a neighbour
```

Concurrency model (object stores have no locks, zarr takes none): chunks run along the sample axis
only, and no two shard writers ever write the same stored object. A writer writes directly only the
chunks that lie entirely inside its shard's rows; its rows of a chunk shared with a neighbouring
shard ("boundary chunk") go to a small staged object of its own, and `FeatureStore.finalize` (a
single writer) merges the staged rows of committed shards into the real chunks. Chunk sizes are
chosen so that equal-size shards share no chunk at all and stage nothing.

A shard's rows are trusted only once its commit record exists: readers (`open_features`) mark every
other row invalid, since its chunks may be half written or still hold an earlier attempt.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from neuropredictor import manifest as mf
from neuropredictor.errors import ConfigMismatchError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    import xarray

    from neuropredictor.corpus import Shard

__all__ = ["DEFAULT_CHUNK_BYTES", "FeatureStore", "LayerSpec", "ShardWriter", "open_features", "plan_chunk_rows"]

DEFAULT_CHUNK_BYTES = 64 * 2**20  # uncompressed bytes per chunk: big enough for object-store throughput
STIMULUS = "stimulus"  # the sample axis, named the same in every array
MANIFEST = "manifest.json"
STATUS_DIR = "_status"
STAGING_DIR = "_staging"
FEATURES = "features"
KEYS = "keys"
VALID = "valid"
DTYPES = ("float32", "float16")
COMPRESSIONS = ("zstd", "blosc", "gzip", "none")
_KEY_ROW_BYTES = 64  # a guess at one key's stored size, only used to size the keys' chunks

STATUS_PLANNING = "planning"  # manifest written, arrays being created (an interrupted plan is redone)
STATUS_PLANNED = "planned"
STATUS_COMPLETE = "complete"
STATUS_PARTIAL = "partial"

_KIND_COMMIT = "commit"
_KIND_FAILURE = "failure"
_MAX_ERROR_CHARS = 4000
_MERGE_BATCH_BYTES = 256 * 2**20  # staged rows and chunks held in memory at once by finalize


@dataclass(frozen=True)
class LayerSpec:
    """One recorded layer: its module name, per-sample shape after reduction, and the reduction."""

    name: str
    shape: tuple[int, ...]
    reduction: str

    def __post_init__(self) -> None:
        # Shapes arrive as lists from JSON and as torch.Size from the extractor; store plain ints.
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class _PlanShard:
    """The fields of `neuropredictor.corpus.Shard`, for internal use: importing corpus imports torch,
    which a process that only reads or merges a store should not pay for."""

    url: str
    name: str
    count: int
    offset: int


# ---------------------------------------------------------------------------------------------
# Chunk planning


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best, i = 1, 1
    while i * i <= n:
        if n % i == 0:
            for d in (i, n // i):
                if best < d <= limit:
                    best = d
        i += 1
    return best


def plan_chunk_rows(counts: Sequence[int], row_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk (along the sample axis) for an array whose rows take row_bytes each.

    Shards of equal size (all but the last): the largest divisor of that size whose chunk fits in
    chunk_bytes, so chunk boundaries fall on shard boundaries and no chunk is shared. If that
    divisor is tiny (a prime shard size with big rows would mean one object per row), and for
    unequal shards: as many rows as fit in chunk_bytes, at most the median shard size, so that most
    chunks still lie inside one shard and only boundary chunks need staging.
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
    return max(1, min(limit, int(statistics.median(counts))))


def _boundary_chunks(offset: int, count: int, chunk_rows: int, total: int) -> list[int]:
    """Chunks that hold rows of this shard and rows of another one (only its first and last can)."""
    if count <= 0:
        return []
    end = offset + count
    out = []
    for k in sorted({offset // chunk_rows, (end - 1) // chunk_rows}):
        lo, hi = k * chunk_rows, min((k + 1) * chunk_rows, total)
        if lo < offset or hi > end:
            out.append(k)
    return out


def _parse_compression(compression: str) -> tuple[str, int | None]:
    name, _, level = str(compression).partition(":")
    name = name.strip().lower()
    if name not in COMPRESSIONS or (level and (name == "none" or not level.strip().isdigit())):
        raise StoreError(f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)} "
                         "(optionally with a level, e.g. zstd:5)")
    return name, int(level) if level else None


def _compressors(compression: str, for_features: bool) -> Any:
    name, level = _parse_compression(compression)
    if name == "none":
        return None
    if name == "zstd" or not for_features:
        # keys and valid are tiny next to the features; zstd suits strings and bools alike
        return ZstdCodec(level=3 if level is None or name != "zstd" else level)
    if name == "blosc":
        # byte-shuffle groups the exponent bytes of neighbouring floats: much better ratios on activations
        return BloscCodec(cname="zstd", clevel=3 if level is None else level, shuffle="shuffle")
    return GzipCodec(level=5 if level is None else level)


def _dim_names(layer: LayerSpec) -> tuple[str, ...]:
    # Per-layer names: two layers with different widths must not claim one dimension in xarray.
    return (STIMULUS, *(f"{layer.name}.dim_{i}" for i in range(1, len(layer.shape) + 1)))


def _safe_name(name: str) -> str:
    # Shard names become object names under _status/ and _staging/: keep them one path segment.
    safe = quote(name, safe="-_.=+@,")
    return safe.replace(".", "%2E") if safe in (".", "..") else safe


def _feature_path(layer: str) -> str:
    return f"{FEATURES}/{layer}"


# ---------------------------------------------------------------------------------------------
# Filesystem helpers


def _connect(url: str, storage_options: Mapping | None) -> tuple[Any, str]:
    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except (ImportError, ValueError, TypeError) as e:
        raise StoreError(f"cannot open output store {mf.redact_text(url)!r}: {e}") from e
    return fs, root.rstrip("/")


def _invalidate(fs: Any, path: str) -> None:
    # s3fs caches listings; other workers (processes, machines) write under the same prefix
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def _nonempty(fs: Any, path: str) -> bool:
    _invalidate(fs, path)
    try:
        if fs.isfile(path):
            return True
        return bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def _remove_tree(fs: Any, path: str) -> None:
    _invalidate(fs, path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    _invalidate(fs, path)


def _read_json_or_none(fs: Any, path: str) -> Any:
    try:
        return mf.read_json(fs, path)
    except FileNotFoundError:
        return None


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Silence zarr's notes about our non-zarr objects (manifest.json, _status/) and v3 consolidation.

    Both are expected here: the run record lives next to the arrays by design, and consolidated
    metadata is written once, at finalize, for xarray's benefit.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*not recognized as a component of a Zarr hierarchy")
        warnings.filterwarnings("ignore", message=r"Consolidated metadata is currently not part")
        yield


# ---------------------------------------------------------------------------------------------
# The store


class FeatureStore:
    """One run's Zarr store: planned once by `create`, written shard by shard, sealed by `finalize`.

    Instances are cheap; every process (or thread) may open its own with `FeatureStore.open`.
    """

    def __init__(self, url: str, storage_options: Mapping | None, mode: str, fs: Any, root: str,
                 manifest: dict) -> None:
        # Use `create` or `open`; this only wires the parts together.
        self._url = url
        self._storage_options = dict(storage_options or {})
        self._mode = mode
        self._fs = fs
        self._root = root
        self._manifest = manifest
        self._zstore: Any = None
        self._arrays: dict[str, Any] = {}
        self._plan_cache: list[_PlanShard] | None = None
        self._lock = threading.Lock()
        self._open_writers: dict[str, ShardWriter] = {}
        self._writer_stats: dict[str, dict] = {}

    def __repr__(self) -> str:
        return (f"FeatureStore({mf.redact_text(self._url)!r}, status={self._manifest.get('status')!r}, "
                f"shards={len(self._manifest.get('shards', []))}, layers={[lay.name for lay in self.layers]})")

    # -- creating and opening -----------------------------------------------------------------

    @classmethod
    def create(cls, url: str, shards: list[Shard], layers: list[LayerSpec], config: dict,
               dtype: str = "float32", compression: str = "zstd",
               storage_options: dict | None = None, overwrite: bool = False, *,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> FeatureStore:
        """Plan step: create every array once, write manifest.json with status 'planned'.

        If a store already exists at url: same config (config dict, shard plan, layers, dtype,
        compression, chunk size) -> open it and return it (resume); different ->
        ConfigMismatchError listing each differing field as `field: stored=... requested=...`, and
        nothing is written. overwrite=True deletes whatever is at url first. A non-empty url that
        is not one of our stores (no manifest.json) -> StoreError, never touched without overwrite.

        chunk_bytes: target uncompressed size of one chunk (see `plan_chunk_rows`).
        """
        shards = list(shards)
        layers = [lay if isinstance(lay, LayerSpec) else LayerSpec(**lay) for lay in layers]
        _check_plan(shards, layers, dtype, compression, chunk_bytes)
        fs, root = _connect(url, storage_options)
        total = sum(int(s.count) for s in shards)
        counts = [int(s.count) for s in shards]
        itemsize = np.dtype(dtype).itemsize
        chunk_rows = {_feature_path(lay.name): plan_chunk_rows(counts, itemsize * int(np.prod(lay.shape)), chunk_bytes)
                      for lay in layers}
        chunk_rows[KEYS] = plan_chunk_rows(counts, _KEY_ROW_BYTES, chunk_bytes)
        chunk_rows[VALID] = plan_chunk_rows(counts, 1, chunk_bytes)
        requested = {
            "config": mf.redact(mf.canonical(config)),
            "layers": [{"name": lay.name, "shape": list(lay.shape), "dtype": dtype, "reduction": lay.reduction}
                       for lay in layers],
            "storage": {"dtype": dtype, "compression": compression, "chunk_bytes": int(chunk_bytes),
                        "chunk_rows": chunk_rows, "rows": total},
        }
        plan = [{"name": s.name, "count": int(s.count), "offset": int(s.offset)} for s in shards]
        manifest_path = f"{root}/{MANIFEST}"
        if overwrite:
            if root in ("", "/") or (not mf._is_local(fs) and "/" not in root):
                raise StoreError(f"refusing to delete all of {mf.redact_text(url)!r}: choose a sub-folder as --out")
            _remove_tree(fs, root)
        elif _nonempty(fs, root):
            existing = _read_json_or_none(fs, manifest_path)
            if existing is None:
                raise StoreError(
                    f"{mf.redact_text(url)!r} is not empty and holds no neuropredictor store (no {MANIFEST}); "
                    "refusing to write there. Choose another --out, or pass overwrite=True (CLI --overwrite) "
                    "to delete its contents.")
            if existing.get("format") != mf.FORMAT:
                raise StoreError(f"{mf.redact_text(url)!r} has a {MANIFEST} of another format "
                                 f"({existing.get('format')!r}); choose another --out or pass overwrite=True")
            diffs = _plan_diffs(existing, requested, plan)
            if diffs:
                raise ConfigMismatchError(
                    f"the store at {mf.redact_text(url)!r} was made with a different configuration:\n  "
                    + "\n  ".join(diffs)
                    + "\nPass overwrite=True (CLI: --overwrite) to replace it, or choose another --out.")
            if existing.get("status") != STATUS_PLANNING:
                return cls(url, storage_options, "r+", fs, root, existing)  # resume
            # else: an interrupted plan step; no shard has written yet, so make the arrays again
        manifest = mf.build_manifest(config=config, layers=requested["layers"], shards=shards,
                                     storage=requested["storage"], status=STATUS_PLANNING)
        # The manifest goes first, so a crash half-way through leaves a store we recognise as ours.
        mf.write_json_atomic(fs, manifest_path, manifest)
        store = cls(url, storage_options, "r+", fs, root, manifest)
        store._create_arrays(layers, dtype, compression, total, chunk_rows)
        manifest["status"] = STATUS_PLANNED
        manifest["updated"] = mf.now_iso()
        mf.write_json_atomic(fs, manifest_path, manifest)
        return store

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r+") -> FeatureStore:
        """Open an existing store; mode "r" (read only) or "r+" (write shards, commit, finalize)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        fs, root = _connect(url, storage_options)
        manifest = _read_json_or_none(fs, f"{root}/{MANIFEST}")
        if manifest is None:
            raise StoreError(f"no neuropredictor store at {mf.redact_text(url)!r} ({MANIFEST} not found); "
                             "check the path, or create it with `neuropredictor extract --out ...`")
        if manifest.get("format") != mf.FORMAT:
            raise StoreError(f"{mf.redact_text(url)!r}: {MANIFEST} has format {manifest.get('format')!r}, "
                             f"expected {mf.FORMAT!r}")
        return cls(url, storage_options, mode, fs, root, manifest)

    def _create_arrays(self, layers: list[LayerSpec], dtype: str, compression: str, total: int,
                       chunk_rows: dict[str, int]) -> None:
        zs = self._zarr_store()
        zarr.open_group(zs, mode="a", zarr_format=3)
        zarr.open_group(zs, path=FEATURES, mode="a", zarr_format=3)
        for lay in layers:
            path = _feature_path(lay.name)
            zarr.create_array(zs, name=path, shape=(total, *lay.shape), chunks=(chunk_rows[path], *lay.shape),
                              dtype=dtype, fill_value=np.nan, compressors=_compressors(compression, True),
                              dimension_names=_dim_names(lay), overwrite=True, zarr_format=3,
                              attributes={"layer": lay.name, "reduction": lay.reduction})
        zarr.create_array(zs, name=KEYS, shape=(total,), chunks=(chunk_rows[KEYS],), dtype=str, fill_value="",
                          compressors=_compressors(compression, False), dimension_names=(STIMULUS,),
                          overwrite=True, zarr_format=3)
        zarr.create_array(zs, name=VALID, shape=(total,), chunks=(chunk_rows[VALID],), dtype=bool,
                          fill_value=False, compressors=_compressors(compression, False),
                          dimension_names=(STIMULUS,), overwrite=True, zarr_format=3)

    def _zarr_store(self) -> Any:
        if self._zstore is None:
            read_only = self._mode == "r"
            if mf._is_local(self._fs):
                self._zstore = zarr.storage.LocalStore(self._root, read_only=read_only)
            else:
                self._zstore = zarr.storage.FsspecStore.from_url(
                    self._url, storage_options=self._storage_options, read_only=read_only)
        return self._zstore

    def _array(self, path: str) -> Any:
        """The zarr array at path, opened r+ once per FeatureStore (metadata is fixed after create)."""
        with self._lock:
            arr = self._arrays.get(path)
        if arr is None:
            arr = zarr.open_array(self._zarr_store(), path=path, mode="r" if self._mode == "r" else "r+",
                                  zarr_format=3)
            with self._lock:
                arr = self._arrays.setdefault(path, arr)
        return arr

    # -- what the manifest says -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def manifest(self) -> dict:
        """The manifest as last read or written by this object (not re-read from the store)."""
        return self._manifest

    @property
    def config(self) -> dict:
        return self._manifest["config"]

    @property
    def shards(self) -> list[Shard]:
        from neuropredictor.corpus import Shard

        return [Shard(url=s.url, name=s.name, count=s.count, offset=s.offset) for s in self._plan()]

    def _plan(self) -> list[_PlanShard]:
        # The plan never changes after create (finalize rewrites the manifest with the same shards).
        if self._plan_cache is None:
            self._plan_cache = [_PlanShard(url=e.get("url", ""), name=e["name"], count=int(e["count"]),
                                           offset=int(e["offset"])) for e in self._manifest["shards"]]
        return self._plan_cache

    @property
    def layers(self) -> list[LayerSpec]:
        return [LayerSpec(d["name"], tuple(d["shape"]), d["reduction"]) for d in self._manifest.get("layers", [])]

    @property
    def dtype(self) -> str:
        return self._manifest["storage"]["dtype"]

    @property
    def chunk_rows(self) -> dict[str, int]:
        """Rows per chunk of each array, by array path (`features/<layer>`, `keys`, `valid`)."""
        return dict(self._manifest["storage"]["chunk_rows"])

    @property
    def rows(self) -> int:
        return int(self._manifest["storage"]["rows"])

    # -- paths ------------------------------------------------------------------------------

    def _status_path(self, shard_name: str, failed: bool = False) -> str:
        return f"{self._root}/{STATUS_DIR}/{_safe_name(shard_name)}{'.failed' if failed else ''}.json"

    def _staging_dir(self, shard_name: str | None = None) -> str:
        base = f"{self._root}/{STAGING_DIR}"
        return base if shard_name is None else f"{base}/{_safe_name(shard_name)}"

    def _staged_path(self, shard_name: str, array_path: str, chunk: int) -> str:
        return f"{self._staging_dir(shard_name)}/{array_path}/{chunk}.npy"

    def _expected_staged(self, shard: Any) -> list[str]:
        out = []
        for path, rows in self.chunk_rows.items():
            for k in _boundary_chunks(int(shard.offset), int(shard.count), rows, self.rows):
                out.append(self._staged_path(shard.name, path, k))
        return out

    # -- status records -------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"{mf.redact_text(self._url)!r} was opened read-only (mode='r')")

    def _planned(self, shard: Any) -> _PlanShard:
        """The store's own record of a shard the caller names (count and offset must agree)."""
        s = next((s for s in self._plan() if s.name == shard.name), None)
        if s is None:
            raise StoreError(f"shard {shard.name!r} is not in the plan of {mf.redact_text(self._url)!r}")
        if (s.count, s.offset) != (int(shard.count), int(shard.offset)):
            raise StoreError(f"shard {shard.name!r}: count/offset {shard.count}/{shard.offset} differ from "
                             f"the store's plan {s.count}/{s.offset}")
        return s

    def _status_records(self) -> list[dict]:
        status_dir = f"{self._root}/{STATUS_DIR}"
        _invalidate(self._fs, status_dir)
        try:
            names = self._fs.ls(status_dir, detail=False)
        except FileNotFoundError:
            return []
        paths = [p for p in names if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith(".")]
        if not paths:
            return []
        blobs = self._fs.cat(paths, on_error="omit")  # concurrent GETs on object stores
        out = []
        for blob in blobs.values():
            with contextlib.suppress(ValueError):
                rec = json.loads(blob)
                if isinstance(rec, dict) and "shard" in rec:
                    out.append(rec)
        return out

    def commit_record(self, shard_name: str) -> dict | None:
        """The shard's commit record, or None if it has none (its rows are not complete and trusted)."""
        rec = _read_json_or_none(self._fs, self._status_path(shard_name))
        ok = isinstance(rec, dict) and rec.get("kind") == _KIND_COMMIT and rec.get("shard") == shard_name
        return rec if ok else None

    def is_committed(self, shard_name: str) -> bool:
        """Whether the shard's commit record exists (its rows are complete and trusted)."""
        return self.commit_record(shard_name) is not None

    def committed(self) -> dict[str, dict]:
        """Shard name -> commit record, for every committed shard."""
        return self._records_by_kind()[0]

    def failures(self) -> dict[str, dict]:
        """Shard name -> last failure record (shards that later committed included)."""
        return self._records_by_kind()[1]

    def _records_by_kind(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """(commits, failures) by shard name, from one listing of _status/."""
        commits: dict[str, dict] = {}
        failures: dict[str, dict] = {}
        for rec in self._status_records():
            if rec.get("kind") == _KIND_COMMIT:
                commits[rec["shard"]] = rec
            elif rec.get("kind") == _KIND_FAILURE:
                failures[rec["shard"]] = rec
        return commits, failures

    # -- writing ------------------------------------------------------------------------------

    def writer(self, shard: Shard) -> ShardWriter:
        """A writer for one shard's rows. Opens the arrays with mode r+ (never re-creates them).

        Starting a writer withdraws an earlier commit of the shard (its rows are about to be
        rewritten, so they are no longer trusted) and drops its stale staged rows.
        """
        self._require_writable()
        shard = self._planned(shard)
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._status_path(shard.name))
        if self._expected_staged(shard):
            _remove_tree(self._fs, self._staging_dir(shard.name))
        writer = ShardWriter(self, shard, {path: self._array(path) for path in self.chunk_rows})
        with self._lock:
            self._open_writers[shard.name] = writer
        return writer

    def _writer_closed(self, writer: ShardWriter, stats: dict) -> None:
        name = writer.shard.name
        with self._lock:
            if self._open_writers.get(name) is writer:  # not a newer attempt's writer
                del self._open_writers[name]
                self._writer_stats[name] = stats

    def commit(self, shard: Shard, record: dict) -> None:
        """Mark the shard done: write `_status/<shard>.json`, after all of its data.

        record: whatever the caller wants kept (attempts, duration_s, device, host, images_per_s,
        bad_samples=[{key, reason}], valid=<count>...); credentials are redacted. The record is one
        atomic write (single PUT / rename), so it is either absent or complete.
        """
        self._require_writable()
        shard = self._planned(shard)
        with self._lock:
            if shard.name in self._open_writers:
                raise StoreError(f"shard {shard.name!r}: close its writer before commit "
                                 "(the commit record must come after the data)")
            stats = self._writer_stats.get(shard.name)
        expected = self._expected_staged(shard)
        if expected:
            _invalidate(self._fs, self._staging_dir(shard.name))
            try:
                present = {self._fs._strip_protocol(p) for p in self._fs.find(self._staging_dir(shard.name))}
            except FileNotFoundError:
                present = set()
            missing = [p for p in expected if self._fs._strip_protocol(p) not in present]
            if missing:
                raise StoreError(f"shard {shard.name!r}: {len(missing)} staged boundary object(s) missing "
                                 f"(e.g. {missing[0]}); write the shard again before committing it")
        rec: dict[str, Any] = {"kind": _KIND_COMMIT, "shard": shard.name, "offset": int(shard.offset),
                               "count": int(shard.count), "committed_at": mf.now_iso(), "host": mf.hostname()}
        rec.update({k: v for k, v in mf.redact(dict(record)).items() if k not in ("kind", "shard", "bad_samples")})
        rec["bad_samples"] = mf._bad_samples(record, shard.name)
        if stats is not None and "stats" not in rec:
            rec["stats"] = stats
        mf.write_json_atomic(self._fs, self._status_path(shard.name), rec)

    def record_failure(self, shard: Shard, error: str, attempts: int) -> None:
        """Keep the shard's last error (`_status/<shard>.failed.json`); the shard stays uncommitted."""
        self._require_writable()
        shard = self._planned(shard)
        rec = {"kind": _KIND_FAILURE, "shard": shard.name, "offset": int(shard.offset), "count": int(shard.count),
               "error": mf.redact_text(str(error))[:_MAX_ERROR_CHARS], "attempts": int(attempts),
               "failed_at": mf.now_iso(), "host": mf.hostname()}
        mf.write_json_atomic(self._fs, self._status_path(shard.name, failed=True), rec)

    # -- finalize -----------------------------------------------------------------------------

    def finalize(self) -> dict:
        """Merge staged boundary rows of committed shards into the real chunks, merge commit records
        (and failure records) into manifest.json (status 'complete' if every shard committed, else
        'partial'), consolidate zarr metadata, return the manifest. Idempotent.

        Run it from one process at a time (it is the only writer of shared chunks). Staged rows are
        deleted once merged; a chunk is rebuilt from its current contents plus the new rows, so
        rows merged by an earlier finalize are kept.
        """
        self._require_writable()
        commits, failures = self._records_by_kind()
        shards = self._plan()
        total = self.rows
        merged = self._merge_staged(shards, set(commits))
        for name in merged:
            _remove_tree(self._fs, self._staging_dir(name))
        if merged and mf._is_local(self._fs):
            with contextlib.suppress(OSError):  # only if empty: other shards may still have rows waiting
                self._fs.rmdir(self._staging_dir())
        zs = self._zarr_store()
        valid = self._array(VALID)[:]
        valid_rows = int(sum(valid[s.offset:s.offset + s.count].sum() for s in shards if s.name in commits))
        complete = all(s.name in commits for s in shards)
        with _quiet_zarr():
            zarr.consolidate_metadata(zs, path=FEATURES)
            zarr.consolidate_metadata(zs)
        manifest = mf.build_manifest(config=self.config, layers=self._manifest["layers"], shards=shards,
                                     storage=self._manifest["storage"],
                                     status=STATUS_COMPLETE if complete else STATUS_PARTIAL,
                                     commits=commits, failures=failures, valid_rows=valid_rows,
                                     created=self._manifest.get("created"))
        # Written last: 'complete' in the manifest means the data and the metadata are sealed.
        mf.write_json_atomic(self._fs, f"{self._root}/{MANIFEST}", manifest)
        self._manifest = manifest
        return manifest

    def _merge_staged(self, shards: list[_PlanShard], committed: set[str]) -> list[str]:
        """Write the staged rows of committed shards into their boundary chunks; return the shards merged."""
        fs, total = self._fs, self.rows
        staging = self._staging_dir()
        _invalidate(fs, staging)
        try:
            present = {fs._strip_protocol(p) for p in fs.find(staging)}
        except FileNotFoundError:
            present = set()
        if not present:
            return []
        merged: set[str] = set()
        for path, rows in self.chunk_rows.items():
            # chunk -> the shards with rows in it, and the pieces still waiting there
            owners: dict[int, list[_PlanShard]] = {}
            for s in shards:
                for k in _boundary_chunks(s.offset, s.count, rows, total):
                    owners.setdefault(k, []).append(s)
            todo = []
            for k, members in sorted(owners.items()):
                pieces, merged_before = [], False
                for s in members:
                    if s.name not in committed:
                        continue
                    p = fs._strip_protocol(self._staged_path(s.name, path, k))
                    if p in present:
                        pieces.append((max(k * rows, s.offset), p))
                        merged.add(s.name)
                    else:
                        merged_before = True  # committed, its piece merged and deleted by an earlier finalize
                if pieces:
                    todo.append((k, pieces, merged_before))
            if not todo:
                continue
            arr = self._array(path)
            chunk_bytes = rows * max(1, _row_nbytes(arr))
            group = max(1, _MERGE_BATCH_BYTES // chunk_bytes)  # bounds the memory held at once
            for i in range(0, len(todo), group):
                batch = todo[i:i + group]
                blobs = {fs._strip_protocol(p): b
                         for p, b in fs.cat([p for _, pcs, _ in batch for _, p in pcs]).items()}

                def merge_one(item: tuple[int, list[tuple[int, str]], bool], arr: Any = arr,
                              blobs: dict = blobs, rows: int = rows) -> None:
                    k, pieces, merged_before = item
                    lo, hi = k * rows, min((k + 1) * rows, total)
                    # Start from fill unless rows merged by an earlier finalize live in this chunk; rows of
                    # uncommitted shards are fill either way (their writers never touch shared chunks).
                    # (arr.dtype: StringDType for keys, so any key length fits)
                    chunk = np.array(arr[lo:hi]) if merged_before else np.full(
                        (hi - lo, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
                    for start, p in pieces:
                        data = np.load(io.BytesIO(blobs[p]), allow_pickle=False)
                        chunk[start - lo:start - lo + len(data)] = data
                    arr[lo:hi] = chunk  # one whole-chunk write

                with ThreadPoolExecutor(min(8, len(batch))) as pool:
                    list(pool.map(merge_one, batch))
        return sorted(merged)


def _check_plan(shards: list[Any], layers: list[LayerSpec], dtype: str, compression: str, chunk_bytes: int) -> None:
    if dtype not in DTYPES:
        raise StoreError(f"unsupported store dtype {dtype!r}: use one of {', '.join(DTYPES)} "
                         "(bfloat16 has no zarr dtype; activations are cast before writing)")
    _parse_compression(compression)
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


def _plan_diffs(existing: dict, requested: dict, plan: list[dict]) -> list[str]:
    """`field: stored=... requested=...` lines between a stored manifest and a requested plan."""
    diffs = [f"config.{d}" if not d.startswith("<") else f"config: {d.split(': ', 1)[1]}"
             for d in mf.diff_configs(existing.get("config", {}), requested["config"])]
    stored_layers = {d["name"]: d for d in existing.get("layers", [])}
    req_layers = {d["name"]: d for d in requested["layers"]}
    layer_diffs = []
    for name in sorted(set(stored_layers) | set(req_layers)):
        a, b = stored_layers.get(name), req_layers.get(name)
        if a != b:
            layer_diffs.append(f"layers.{name}: stored={mf._short(a) if a else '<missing>'} "
                               f"requested={mf._short(b) if b else '<missing>'}")
    stored_order, req_order = list(stored_layers), list(req_layers)
    if not layer_diffs and stored_order != req_order:
        layer_diffs.append(f"layers: stored={mf._short(stored_order)} requested={mf._short(req_order)} (order)")
    diffs += layer_diffs
    stored_storage = existing.get("storage", {})
    for field in ("dtype", "compression", "chunk_bytes"):
        if stored_storage.get(field) != requested["storage"][field]:
            diffs.append(f"{field}: stored={mf._short(stored_storage.get(field))} "
                         f"requested={mf._short(requested['storage'][field])}")
    a = [{"name": e["name"], "count": e["count"], "offset": e["offset"]} for e in existing.get("shards", [])]
    b = plan
    if a != b:
        rows_a, rows_b = sum(p["count"] for p in a), sum(p["count"] for p in b)
        diffs.append(f"shards: stored={len(a)} shards/{rows_a} rows requested={len(b)} shards/{rows_b} rows")
        shown = 0
        for i in range(max(len(a), len(b))):
            pa, pb = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
            if pa != pb and shown < 5:
                diffs.append(f"shards[{i}]: stored={mf._short(pa) if pa else '<missing>'} "
                             f"requested={mf._short(pb) if pb else '<missing>'}")
                shown += 1
    return diffs


# ---------------------------------------------------------------------------------------------
# Writing one shard


class _ArrayBuffer:
    """Rows of one array waiting to be written, from global row `start` on (at most about a chunk)."""

    def __init__(self, array: Any, path: str, chunk_rows: int, fill: Any, dtype: Any, row_shape: tuple[int, ...]):
        self.array, self.path, self.chunk_rows = array, path, chunk_rows
        self.fill, self.dtype, self.row_shape = fill, dtype, row_shape
        self.parts: list[np.ndarray] = []
        self.start = 0
        self.rows = 0

    @property
    def end(self) -> int:
        return self.start + self.rows

    def append(self, data: np.ndarray) -> None:
        self.parts.append(data)
        self.rows += len(data)

    def take(self, upto: int) -> np.ndarray:
        """Remove and return the buffered rows before global row `upto`."""
        data = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        n = upto - self.start
        head, rest = data[:n], data[n:]
        self.parts = [rest] if len(rest) else []
        self.start, self.rows = upto, len(rest)
        return head

    def fill_rows(self, n: int) -> np.ndarray:
        return np.full((n, *self.row_shape), self.fill, dtype=self.dtype)


class ShardWriter:
    """Writes one shard's rows: whole chunks into the arrays, shared boundary chunks into staging.

    Get one from `FeatureStore.writer`; one writer per shard, used from one thread.
    """

    def __init__(self, store: FeatureStore, shard: Any, arrays: dict[str, Any]) -> None:
        self._store = store
        self._shard = shard
        self._offset = int(shard.offset)
        self._count = int(shard.count)
        self._end = self._offset + self._count
        self._total = store.rows
        self._dtype = np.dtype(store.dtype)
        self._layers = store.layers
        self._next = 0
        self._closed = False
        self._stats = {"rows": 0, "padded_rows": 0, "bytes": 0, "chunks": 0, "staged_objects": 0}
        rows = store.chunk_rows
        self._buffers: dict[str, _ArrayBuffer] = {}
        for lay in self._layers:
            path = _feature_path(lay.name)
            self._buffers[path] = _ArrayBuffer(arrays[path], path, rows[path], np.nan, self._dtype, lay.shape)
        # '<U' (fixed width) in memory: it saves to .npy without pickle; zarr stores it as vlen utf-8.
        self._buffers[KEYS] = _ArrayBuffer(arrays[KEYS], KEYS, rows[KEYS], "", np.dtype("<U1"), ())
        self._buffers[VALID] = _ArrayBuffer(arrays[VALID], VALID, rows[VALID], False, np.dtype(bool), ())
        for buf in self._buffers.values():
            buf.start = self._offset

    @property
    def shard(self) -> Any:
        return self._shard

    def write(self, start: int, keys: list[str], valid: np.ndarray, features: dict[str, np.ndarray]) -> None:
        """Rows [start, start+len(keys)) of this shard (start is the position within the shard).

        Calls come in increasing, contiguous order. Rows are buffered and written as whole chunks
        (never a partial write into a chunk another shard owns part of). Features are copied and cast
        to the store dtype (the caller may reuse its buffers); rows with valid False are stored as NaN.
        """
        if self._closed:
            raise StoreError(f"shard {self._shard.name!r}: writer already closed")
        n = len(keys)
        if int(start) != self._next:
            raise StoreError(f"shard {self._shard.name!r}: rows must come in order; expected start={self._next}, "
                             f"got {start}")
        if self._next + n > self._count:
            raise StoreError(f"shard {self._shard.name!r}: rows {start}..{start + n} exceed its count {self._count}")
        valid = np.asarray(valid, dtype=bool).reshape(-1)
        if len(valid) != n:
            raise StoreError(f"shard {self._shard.name!r}: {n} keys but {len(valid)} valid flags")
        expected = {lay.name for lay in self._layers}
        if set(features) != expected:
            missing, extra = sorted(expected - set(features)), sorted(set(features) - expected)
            raise StoreError(f"shard {self._shard.name!r}: features do not match the store's layers "
                             f"(missing {missing}, unexpected {extra})")
        prepared: dict[str, np.ndarray] = {}
        for lay in self._layers:
            x = features[lay.name]
            if hasattr(x, "detach"):  # a torch tensor slipped through (maybe bfloat16, which numpy lacks)
                x = x.detach().float().cpu().numpy()
            x = np.array(x, dtype=self._dtype, copy=True)  # a copy: the caller may reuse its buffer
            if x.shape != (n, *lay.shape):
                raise StoreError(f"shard {self._shard.name!r}, layer {lay.name!r}: got shape {x.shape}, "
                                 f"expected {(n, *lay.shape)}")
            if not valid.all():
                x[~valid] = np.nan  # an undecodable sample has no features
            prepared[_feature_path(lay.name)] = x
        prepared[KEYS] = np.array([str(k) for k in keys], dtype=str) if n else np.zeros(0, "<U1")
        prepared[VALID] = valid.copy()
        for path, data in prepared.items():
            buf = self._buffers[path]
            buf.append(data)
            self._flush(buf, final=False)
        self._next += n
        self._stats["rows"] += n

    def close(self) -> dict:
        """Write what is buffered, padding rows never written with fill (NaN, "", invalid), so a
        shard always ends with every one of its chunks rewritten; return stats
        (rows, padded_rows, bytes, chunks, staged_objects)."""
        if self._closed:
            return dict(self._stats)
        missing = self._count - self._next
        for buf in self._buffers.values():
            while buf.end < self._end:
                # pad one chunk at a time, so memory stays bounded by the chunk size
                step = min(self._end - buf.end, buf.chunk_rows - buf.end % buf.chunk_rows)
                buf.append(buf.fill_rows(step))
                self._flush(buf, final=False)
            self._flush(buf, final=True)
        self._stats["padded_rows"] = missing
        self._closed = True
        stats = dict(self._stats, shard=self._shard.name)
        self._store._writer_closed(self, stats)
        return dict(stats)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()

    def _flush(self, buf: _ArrayBuffer, final: bool) -> None:
        c = buf.chunk_rows
        # Emit up to the last chunk boundary reached (or the shard's end): each chunk's part of this
        # shard then goes out in exactly one piece.
        upto = buf.end if (final or buf.end == self._end) else (buf.end // c) * c
        if upto <= buf.start:
            return
        lo = buf.start
        data = buf.take(upto)
        own_lo = own_hi = None  # run of chunks entirely inside this shard, written with one call
        k = lo // c
        while k * c < upto:
            a, b = max(k * c, lo), min((k + 1) * c, upto)
            inside = k * c >= self._offset and min((k + 1) * c, self._total) <= self._end
            if inside:
                own_lo = a if own_lo is None else own_lo
                own_hi = b
            else:
                self._write_own(buf, data, lo, own_lo, own_hi)
                own_lo = own_hi = None
                self._stage(buf, k, data[a - lo:b - lo])
            k += 1
        self._write_own(buf, data, lo, own_lo, own_hi)

    def _write_own(self, buf: _ArrayBuffer, data: np.ndarray, lo: int, a: int | None, b: int | None) -> None:
        if a is None or b is None:
            return
        block = data[a - lo:b - lo]
        buf.array[a:b] = block
        c = buf.chunk_rows
        self._stats["chunks"] += (b - 1) // c - a // c + 1
        self._stats["bytes"] += _nbytes(block)

    def _stage(self, buf: _ArrayBuffer, chunk: int, block: np.ndarray) -> None:
        path = self._store._staged_path(self._shard.name, buf.path, chunk)
        mf.write_bytes_atomic(self._store._fs, path, _npy_bytes(block))
        self._stats["staged_objects"] += 1
        self._stats["bytes"] += _nbytes(block)


def _row_nbytes(arr: Any) -> int:
    """Uncompressed bytes of one row of a zarr array (strings: the sizing guess)."""
    dt = np.dtype(arr.dtype)
    per_row = int(np.prod(arr.shape[1:])) if len(arr.shape) > 1 else 1
    return per_row * (_KEY_ROW_BYTES if dt.kind in ("T", "O", "U") else dt.itemsize)


def _nbytes(block: np.ndarray) -> int:
    if block.dtype.kind == "U":  # count keys as their UTF-8 size, not numpy's 4 bytes per character
        return int(sum(len(s.encode("utf-8")) for s in block.tolist()))
    return int(block.nbytes)


# ---------------------------------------------------------------------------------------------
# Reading


def open_features(url: str, storage_options: dict | None = None, committed_only: bool = True) -> xarray.Dataset:
    """xarray Dataset: one data variable per layer (dims stimulus, ...), `valid` variable, and `key`
    coordinate on `stimulus` taken from `keys`.

    With committed_only, rows of shards without a commit record are marked invalid (valid False):
    their chunks may be half written. (Rows of committed shards that fall in a boundary chunk read
    as invalid until `finalize` has merged them.) Lazy: the feature variables are read on access
    (no dask needed); keys and valid are loaded.
    """
    import xarray as xr

    store = FeatureStore.open(url, storage_options, mode="r")
    zs = store._zarr_store()
    # Consolidated metadata exists once finalize ran; before that, read each array's own metadata.
    consolidated = store.manifest.get("status") in (STATUS_COMPLETE, STATUS_PARTIAL)
    with _quiet_zarr():
        feats = xr.open_zarr(zs, group=FEATURES, chunks=None, consolidated=consolidated, zarr_format=3)
        root = xr.open_zarr(zs, chunks=None, consolidated=consolidated, zarr_format=3)
        keys = np.asarray(root[KEYS].values, dtype=object)
        valid = np.asarray(root[VALID].values, dtype=bool).copy()
    if committed_only:
        trusted = np.zeros(len(valid), dtype=bool)
        commits = store.committed()
        for s in store._plan():
            if s.name in commits:
                trusted[s.offset:s.offset + s.count] = True
        valid &= trusted
    ds = feats.assign({VALID: ((STIMULUS,), valid)}).assign_coords(key=((STIMULUS,), keys))
    ds.attrs.update({"store": mf.redact_text(url), "status": store.manifest.get("status"),
                     "config_hash": store.manifest.get("config_hash")})
    return ds
