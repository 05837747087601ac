"""One run's store: planned once by `FeatureStore.create`, written shard by shard, sealed by `finalize`.

A shard's rows are trusted only once its commit record exists: readers (`open_features`) mark every
other row invalid, since its chunks may be half written or still hold an earlier attempt.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from neuropredictor import fs as fsx
from neuropredictor import manifest as mf
from neuropredictor.redact import redact_text
from neuropredictor.errors import ConfigMismatchError, StoreError
from neuropredictor.shard import Shard
from neuropredictor.status import StoreStatus
from neuropredictor.store.layout import (
    DEFAULT_CHUNK_BYTES,
    FEATURES,
    KEYS,
    MANIFEST,
    STIMULUS,
    VALID,
    LayerSpec,
    check_plan,
    compressors,
    dim_names,
    feature_path,
    plan_all_chunk_rows,
    quiet_zarr,
)
from neuropredictor.store.records import Records
from neuropredictor.store.staging import Staging
from neuropredictor.store.writer import ShardWriter


class FeatureStore:
    """One run's Zarr store. Instances are cheap; every process (or thread) may open its own."""

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
        self._shards: list[Shard] | None = None
        self._lock = threading.Lock()
        self.records = Records(fs, root)

    def __repr__(self) -> str:
        return (f"FeatureStore({redact_text(self._url)!r}, status={self._manifest.get('status')!r}, "
                f"shards={len(self._manifest.get('shards', []))}, layers={[lay.name for lay in self.layers]})")

    # -- creating and opening -----------------------------------------------------------------

    @classmethod
    def create(cls, url: str, shards: Sequence[Shard], layers: Sequence[LayerSpec | Mapping], config: dict,
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
        check_plan(shards, layers, dtype, compression, chunk_bytes)
        fs, root = fsx.connect(url, storage_options, error=StoreError, what="output store")
        total = sum(int(s.count) for s in shards)
        chunk_rows = plan_all_chunk_rows(shards, layers, dtype, chunk_bytes)
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
            if root in ("", "/") or (not fsx.is_local(fs) and "/" not in root):
                raise StoreError(f"refusing to delete all of {redact_text(url)!r}: choose a sub-folder as `out`")
            fsx.remove_tree(fs, root)
        elif fsx.nonempty(fs, root):
            existing = fsx.read_json_or_none(fs, manifest_path)
            if existing is None:
                raise StoreError(
                    f"{redact_text(url)!r} is not empty and holds no neuropredictor store (no {MANIFEST}); "
                    "refusing to write there. Choose another `out`, or pass overwrite=True to delete its contents.")
            if existing.get("format") != mf.FORMAT:
                raise StoreError(f"{redact_text(url)!r} has a {MANIFEST} of another format "
                                 f"({existing.get('format')!r}); choose another `out` or pass overwrite=True")
            diffs = plan_diffs(existing, requested, plan)
            if diffs:
                raise ConfigMismatchError(
                    f"the store at {redact_text(url)!r} was made with a different configuration:\n  "
                    + "\n  ".join(diffs)
                    + "\nPass overwrite=True to replace it, or choose another `out`.")
            if existing.get("status") != StoreStatus.PLANNING:
                return cls(url, storage_options, "r+", fs, root, existing)  # resume
            # else: an interrupted plan step; no shard has written yet, so make the arrays again
        manifest = mf.build_manifest(config=config, layers=requested["layers"], shards=shards,
                                     storage=requested["storage"], status=StoreStatus.PLANNING)
        # The manifest goes first, so a crash half-way through leaves a store we recognise as ours.
        fsx.write_json_atomic(fs, manifest_path, manifest)
        store = cls(url, storage_options, "r+", fs, root, manifest)
        store._create_arrays(layers, dtype, compression, total, chunk_rows)
        manifest["status"] = StoreStatus.PLANNED
        manifest["updated"] = mf.now_iso()
        fsx.write_json_atomic(fs, manifest_path, manifest)
        return store

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r+") -> FeatureStore:
        """Open an existing store; mode "r" (read only) or "r+" (write shards, commit, finalize)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        fs, root = fsx.connect(url, storage_options, error=StoreError, what="store")
        manifest = fsx.read_json_or_none(fs, f"{root}/{MANIFEST}")
        if manifest is None:
            raise StoreError(f"no neuropredictor store at {redact_text(url)!r} ({MANIFEST} not found); "
                             "check the path, or create it with an extraction (`out`)")
        if manifest.get("format") != mf.FORMAT:
            raise StoreError(f"{redact_text(url)!r}: {MANIFEST} has format {manifest.get('format')!r}, "
                             f"expected {mf.FORMAT!r}")
        return cls(url, storage_options, mode, fs, root, manifest)

    def _create_arrays(self, layers: list[LayerSpec], dtype: str, compression: str, total: int,
                       chunk_rows: dict[str, int]) -> None:
        zs = self.zarr_store()
        zarr.open_group(zs, mode="a", zarr_format=3)
        zarr.open_group(zs, path=FEATURES, mode="a", zarr_format=3)
        for lay in layers:
            path = feature_path(lay.name)
            zarr.create_array(zs, name=path, shape=(total, *lay.shape), chunks=(chunk_rows[path], *lay.shape),
                              dtype=dtype, fill_value=np.nan, compressors=compressors(compression, True),
                              dimension_names=dim_names(lay), overwrite=True, zarr_format=3,
                              attributes={"layer": lay.name, "reduction": lay.reduction})
        zarr.create_array(zs, name=KEYS, shape=(total,), chunks=(chunk_rows[KEYS],), dtype=str, fill_value="",
                          compressors=compressors(compression, False), dimension_names=(STIMULUS,),
                          overwrite=True, zarr_format=3)
        zarr.create_array(zs, name=VALID, shape=(total,), chunks=(chunk_rows[VALID],), dtype=bool,
                          fill_value=False, compressors=compressors(compression, False),
                          dimension_names=(STIMULUS,), overwrite=True, zarr_format=3)

    def zarr_store(self) -> Any:
        """The zarr store object under this run's folder (read-only when opened with mode 'r')."""
        if self._zstore is None:
            read_only = self._mode == "r"
            if fsx.is_local(self._fs):
                self._zstore = zarr.storage.LocalStore(self._root, read_only=read_only)
            else:
                self._zstore = zarr.storage.FsspecStore.from_url(
                    self._url, storage_options=self._storage_options, read_only=read_only)
        return self._zstore

    def array(self, path: str) -> Any:
        """The zarr array at path, opened once per FeatureStore (metadata is fixed after create)."""
        with self._lock:
            arr = self._arrays.get(path)
        if arr is None:
            arr = zarr.open_array(self.zarr_store(), path=path, mode="r" if self._mode == "r" else "r+",
                                  zarr_format=3)
            with self._lock:
                arr = self._arrays.setdefault(path, arr)
        return arr

    # -- what the manifest says -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def storage_options(self) -> dict:
        return dict(self._storage_options)

    @property
    def manifest(self) -> dict:
        """The manifest as last read or written by this object (not re-read from the store)."""
        return self._manifest

    @property
    def config(self) -> dict:
        return self._manifest["config"]

    @property
    def shards(self) -> list[Shard]:
        """The plan: every shard with its count and offset (it never changes after create)."""
        if self._shards is None:
            self._shards = [Shard(url=e.get("url", ""), name=e["name"], count=int(e["count"]), offset=int(e["offset"]))
                            for e in self._manifest["shards"]]
        return list(self._shards)

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

    @property
    def staging(self) -> Staging:
        return Staging(self._fs, self._root, self.chunk_rows, self.rows)

    # -- status records -------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"{redact_text(self._url)!r} was opened read-only (mode='r')")

    def planned(self, shard: Shard) -> Shard:
        """The store's own record of a shard the caller names (count and offset must agree)."""
        s = next((s for s in self.shards if s.name == shard.name), None)
        if s is None:
            raise StoreError(f"shard {shard.name!r} is not in the plan of {redact_text(self._url)!r}")
        if (s.count, s.offset) != (int(shard.count), int(shard.offset)):
            raise StoreError(f"shard {shard.name!r}: count/offset {shard.count}/{shard.offset} differ from "
                             f"the store's plan {s.count}/{s.offset}")
        return s

    def commit_record(self, shard_name: str) -> dict | None:
        """The shard's commit record, or None if it has none (its rows are not complete and trusted)."""
        return self.records.commit_record(shard_name)

    def is_committed(self, shard_name: str) -> bool:
        """Whether the shard's commit record exists (its rows are complete and trusted)."""
        return self.commit_record(shard_name) is not None

    def committed(self) -> dict[str, dict]:
        """Shard name -> commit record, for every committed shard (one listing, not a request per shard)."""
        return self.records.by_kind()[0]

    def failures(self) -> dict[str, dict]:
        """Shard name -> last failure record (shards that later committed included)."""
        return self.records.by_kind()[1]

    def status_manifest(self) -> dict:
        """The manifest with every shard's current status, read from the commit and failure records: what
        a finalize would write now, without writing anything (for a running or interrupted run)."""
        if StoreStatus(self._manifest.get("status")).finalized:
            return self._manifest
        commits, failures = self.records.by_kind()
        return mf.build_manifest(config=self.config, layers=self._manifest["layers"], shards=self.shards,
                                 storage=self._manifest["storage"], status=self._manifest["status"],
                                 commits=commits, failures=failures, created=self._manifest.get("created"),
                                 software=self._manifest.get("software"))

    # -- writing ------------------------------------------------------------------------------

    def writer(self, shard: Shard) -> ShardWriter:
        """A writer for one attempt at a shard (see `ShardWriter`). Opens the arrays with mode r+ (never
        re-creates them). Withdraws an earlier commit of the shard (its rows are about to be rewritten,
        so they are no longer trusted) and drops its stale staged rows."""
        self._require_writable()
        shard = self.planned(shard)
        self.records.withdraw(shard.name)
        staging = self.staging
        staging.clear(shard)
        return ShardWriter(shard, {path: self.array(path) for path in self.chunk_rows}, self.layers, self.dtype,
                           self.chunk_rows, self.rows, staging, self.records)

    def record_failure(self, shard: Shard, error: str, attempts: int) -> None:
        """Keep the shard's last error (`_status/<shard>.failed.json`); the shard stays uncommitted."""
        self._require_writable()
        self.records.write_failure(self.planned(shard), error, attempts)

    # -- finalize -----------------------------------------------------------------------------

    def finalize(self) -> dict:
        """Merge staged boundary rows of committed shards into the real chunks, merge commit records
        (and failure records) into manifest.json (status 'complete' if every shard committed, else
        'partial'), consolidate zarr metadata, return the manifest. Idempotent.

        Run it from one process at a time (it is the only writer of shared chunks).
        """
        self._require_writable()
        commits, failures = self.records.by_kind()
        shards = self.shards
        self.staging.merge(shards, set(commits), self.array)
        valid = self.array(VALID)[:]
        valid_rows = int(sum(valid[s.offset:s.end].sum() for s in shards if s.name in commits))
        complete = all(s.name in commits for s in shards)
        zs = self.zarr_store()
        with quiet_zarr():
            zarr.consolidate_metadata(zs, path=FEATURES)
            zarr.consolidate_metadata(zs)
        manifest = mf.build_manifest(config=self.config, layers=self._manifest["layers"], shards=shards,
                                     storage=self._manifest["storage"],
                                     status=StoreStatus.COMPLETE if complete else StoreStatus.PARTIAL,
                                     commits=commits, failures=failures, valid_rows=valid_rows,
                                     created=self._manifest.get("created"))
        # Written last: 'complete' in the manifest means the data and the metadata are sealed.
        fsx.write_json_atomic(self._fs, f"{self._root}/{MANIFEST}", manifest)
        self._manifest = manifest
        return manifest


def plan_diffs(existing: dict, requested: dict, plan: list[dict]) -> list[str]:
    """`field: stored=... requested=...` lines between a stored manifest and a requested plan."""
    diffs = [f"config.{d}" if not d.startswith("<") else f"config: {d.split(': ', 1)[1]}"
             for d in mf.diff_configs(existing.get("config", {}), requested["config"])]
    stored_layers = {d["name"]: d for d in existing.get("layers", [])}
    req_layers = {d["name"]: d for d in requested["layers"]}
    layer_diffs = []
    for name in sorted(set(stored_layers) | set(req_layers)):
        a, b = stored_layers.get(name), req_layers.get(name)
        if a != b:
            layer_diffs.append(f"layers.{name}: stored={mf.short(a) if a else '<missing>'} "
                               f"requested={mf.short(b) if b else '<missing>'}")
    stored_order, req_order = list(stored_layers), list(req_layers)
    if not layer_diffs and stored_order != req_order:
        layer_diffs.append(f"layers: stored={mf.short(stored_order)} requested={mf.short(req_order)} (order)")
    diffs += layer_diffs
    stored_storage = existing.get("storage", {})
    for field in ("dtype", "compression", "chunk_bytes"):
        if stored_storage.get(field) != requested["storage"][field]:
            diffs.append(f"{field}: stored={mf.short(stored_storage.get(field))} "
                         f"requested={mf.short(requested['storage'][field])}")
    a = [{"name": e["name"], "count": e["count"], "offset": e["offset"]} for e in existing.get("shards", [])]
    b = plan
    if a != b:
        rows_a, rows_b = sum(p["count"] for p in a), sum(p["count"] for p in b)
        diffs.append(f"shards: stored={len(a)} shards/{rows_a} rows requested={len(b)} shards/{rows_b} rows")
        shown = 0
        for i in range(max(len(a), len(b))):
            pa, pb = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
            if pa != pb and shown < 5:
                diffs.append(f"shards[{i}]: stored={mf.short(pa) if pa else '<missing>'} "
                             f"requested={mf.short(pb) if pb else '<missing>'}")
                shown += 1
    return diffs
