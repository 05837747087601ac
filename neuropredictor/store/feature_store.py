"""One run's store: planned once by `FeatureStore.create`, written shard by shard, sealed by `finalize`.

A shard's rows are trusted only once its commit record exists: readers (`open_features`) mark every
other row invalid, since its chunks may be half written or still hold an earlier attempt.

Each planning of a store gets a new generation id (`_generation.json`, written once the arrays exist);
commit records name it, so a run still writing into a store that another run replaced can never commit
there. Planning, finalizing and replacing take leases (`store.locks`), so concurrent runs of one store
either join it safely or are told who is using it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import threading
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from neuropredictor import fs as fsx
from neuropredictor import manifest as mf
from neuropredictor.redact import redact_text
from neuropredictor.errors import ConfigMismatchError, StoreError
from neuropredictor.shard import Shard
from neuropredictor.status import ShardStatus, StoreStatus
from neuropredictor.store import locks, metadata
from neuropredictor.store.layout import (
    CLAIMS_DIR,
    DEFAULT_CHUNK_BYTES,
    FEATURES,
    GENERATION,
    KEYS,
    LOCKS_DIR,
    MANIFEST,
    PLAN,
    RUNS_DIR,
    STORE_ENTRIES,
    VALID,
    LayerSpec,
    RowDigest,
    check_plan,
    plan_all_chunk_rows,
    quiet_zarr,
    safe_name,
)
from neuropredictor.store.records import KIND_COMMIT, Records, ShardCommitted
from neuropredictor.store.staging import Staging
from neuropredictor.store.writer import ShardWriter

log = logging.getLogger(__name__)


_PLAN_WAIT_S = 600.0  # how long a planner waits for another one to finish planning the same store
_FINALIZE_WAIT_S = 900.0
_FINALIZE_LOCK = "finalize.json"  # in LOCKS_DIR: held by a finalize, and by a replacement of the store


class ShardBusy(locks.StoreBusyError):
    """Another live run holds the shard's claim (`FeatureStore.claim`): it is extracting the shard now."""

    def __init__(self, shard_name: str, holder: dict) -> None:
        super().__init__(f"shard {shard_name} is being extracted by {locks.describe(holder)}")
        self.holder = holder


class FeatureStore:
    """One run's Zarr store. Instances are cheap; every process (or thread) may open its own."""

    def __init__(self, url: str, storage_options: Mapping | None, mode: str, fs: Any, root: str, plan: dict,
                 manifest: dict | None, generation: str | None, shards: Sequence[Shard] | None = None) -> None:
        # Use `create` or `open`; this only wires the parts together.
        self._url = url
        self._storage_options = dict(storage_options or {})
        self._mode = mode
        self._fs = fs
        self._root = root
        self._plan = plan
        self.generation = generation
        self._zstore: Any = None
        self._arrays: dict[str, Any] = {}
        self._metadata_docs: dict[str, dict] | None = None  # each zarr.json as the plan makes it
        self._shards = None if shards is None else list(shards)  # from create: where they are now (see `shards`)
        self._by_name: dict[str, Shard] | None = None
        self._lock = threading.Lock()
        self.records = Records(fs, root, generation, plan.get("config_hash"))
        self.repairs: list[str] = []  # what opening found damaged and rebuilt (in memory)
        self.replaced: dict | None = None  # what `create(overwrite=True)` deleted, if it replaced a store
        self.withdrawn: dict[str, str] = {}  # damaged shards `withdraw` took back: name -> what was wrong
        self.metadata_rewritten: dict[str, str] = {}  # zarr.json files written again from the plan -> why
        # the shards committed when `pipeline.plan` checked them: the progress event and the queue of shards
        # use it rather than reading every commit record again (a shard committed since is skipped anyway)
        self.committed_at_plan: frozenset[str] | None = None
        if manifest is None:
            self.repairs.append(f"{MANIFEST} was missing or damaged: rebuilt from {PLAN} and the commit records")
            manifest = self._build_manifest(self._fresh_status())
        self._manifest = manifest

    def __repr__(self) -> str:
        return (f"FeatureStore({redact_text(self._url)!r}, status={self._manifest.get('status')!r}, "
                f"shards={len(self._plan.get('shards', []))}, layers={[lay.name for lay in self.layers]})")

    # -- creating and opening -----------------------------------------------------------------

    @classmethod
    def create(cls, url: str, shards: Sequence[Shard], layers: Sequence[LayerSpec | Mapping], config: dict,
               dtype: str = "float32", compression: str = "zstd",
               storage_options: dict | None = None, overwrite: bool = False, *,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, wait_s: float = _PLAN_WAIT_S) -> FeatureStore:
        """Plan step: create every array once, under the planning lease (one planner at a time).

        If a store already exists at url: same config (config dict, shard plan and the shards' files,
        layers, dtype, compression, chunk size) -> open it and return it (resume; also with overwrite:
        nothing is deleted then); different -> ConfigMismatchError listing each differing field as
        `field: stored=... requested=...`, nothing written; with overwrite=True the store's own objects
        are deleted first (`replaced` says what), unless another run is still extracting into it
        (StoreBusyError). A non-empty url that holds no store is never touched, overwrite or not.

        chunk_bytes: target uncompressed size of one chunk (see `plan_chunk_rows`).
        """
        shards = list(shards)
        layers = [lay if isinstance(lay, LayerSpec) else LayerSpec(**lay) for lay in layers]
        check_plan(shards, layers, dtype, compression, chunk_bytes)
        fs, root = fsx.connect(url, storage_options, error=StoreError, what="output store")
        chunk_rows = plan_all_chunk_rows(shards, layers, dtype, chunk_bytes)
        config = mf.redact(mf.canonical(config))
        requested = {
            "format": mf.FORMAT,
            "config": config,
            "config_hash": mf.config_hash(config),
            "layers": [{"name": lay.name, "shape": list(lay.shape), "dtype": dtype, "reduction": lay.reduction}
                       for lay in layers],
            "storage": {"dtype": dtype, "compression": compression, "chunk_bytes": int(chunk_bytes),
                        "chunk_rows": chunk_rows, "rows": sum(int(s.count) for s in shards)},
            "shards": [mf.plan_entry(s) for s in shards],
        }
        refuse_foreign(fs, root, url)
        if overwrite and (root in ("", "/") or (not fsx.is_local(fs) and "/" not in root)):
            raise StoreError(f"refusing to replace all of {redact_text(url)!r}: choose a sub-folder as `out`")
        with locks.acquire(fs, f"{root}/{LOCKS_DIR}/plan.json", "planning", wait_s) as lease:
            found = _Found.read(fs, root, url)
            replaced, diffs = None, []
            if found.plan is not None:
                diffs = plan_diffs(found.plan, requested)
                if not diffs and found.generation is None:
                    found.generation = _restore_generation(fs, root, url, found, lease)
                if not diffs and found.generation is not None:
                    return cls(url, storage_options, "r+", fs, root, found.plan, found.manifest, found.generation,
                               shards)
                if diffs and not overwrite:
                    raise ConfigMismatchError(
                        f"the store at {redact_text(url)!r} was made with a different configuration:\n  "
                        + "\n  ".join(diffs) + "\nPass overwrite=True to replace it, or choose another `out`.")
                # else, without diffs: an interrupted plan step of the same plan; no shard committed, plan it again
            # A replacement holds the finalize lease too: a finalize of the old store running now ends first, and
            # one that starts later finds the new generation and stops, instead of writing the old manifest over.
            with locks.acquire(fs, f"{root}/{LOCKS_DIR}/{_FINALIZE_LOCK}", "replacing", wait_s) if diffs \
                    else contextlib.nullcontext() as replacing:
                if diffs:
                    busy = locks.live(fs, f"{root}/{RUNS_DIR}")
                    if busy:
                        raise locks.StoreBusyError(
                            f"not replacing the store at {redact_text(url)!r}: another run is extracting into it "
                            f"({locks.describe(busy[0])}). Stop it first, or choose another `out`.")
                    lease.check()
                    replacing.check()
                    replaced = _delete_store(fs, root, found)
                lease.check()
                store = cls._plan_new(url, storage_options, fs, root, requested, layers, shards)
            store.replaced = replaced
            return store

    @classmethod
    def _plan_new(cls, url: str, storage_options: Mapping | None, fs: Any, root: str, plan: dict,
                  layers: list[LayerSpec], shards: list[Shard]) -> FeatureStore:
        """Write the plan, create the arrays, then the generation: a store is usable once that exists."""
        plan = dict(plan, created=mf.now_iso(), software=mf.software_versions())
        fsx.write_json_atomic(fs, f"{root}/{PLAN}", plan)
        store = cls(url, storage_options, "r+", fs, root, plan, None, None, shards)
        store.repairs.clear()
        fsx.write_json_atomic(fs, f"{root}/{MANIFEST}", store._manifest)  # status planning: ours, not ready
        metadata.create(store.zarr_store(), layers, plan["storage"])
        generation = uuid.uuid4().hex
        fsx.write_json_atomic(fs, f"{root}/{GENERATION}", {"generation": generation, "config_hash": plan["config_hash"]})
        store.generation = generation
        store.records = Records(fs, root, generation, plan["config_hash"])
        store._manifest = store._build_manifest(StoreStatus.PLANNED)
        fsx.write_json_atomic(fs, f"{root}/{MANIFEST}", store._manifest)
        return store

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r+",
             generation: str | None = None) -> FeatureStore:
        """Open an existing store; mode "r" (read only) or "r+" (write shards, commit, finalize). A damaged
        or missing manifest.json is rebuilt in memory from the plan and the commit records (`repairs`).

        `generation`: the one the caller planned (`FeatureStore.generation`). A store replaced since by another
        run raises StoreError, so a task that opens the store again (an orchestrator's retry) never writes
        its rows into the replacement."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        fs, root = fsx.connect(url, storage_options, error=StoreError, what="store")
        try:
            found = _Found.read(fs, root, url)
        except Exception as exc:  # a file, no credentials: the URL and what to check (a writer retries an outage)
            if fsx.permanent(exc) or (mode == "r" and fsx.storage_failure(exc)):  # a reader is told what to check
                raise StoreError(fsx.unreachable(url, exc, "the store")) from exc
            raise
        if found.plan is None:
            raise StoreError(f"no neuropredictor store at {redact_text(url)!r} ({MANIFEST} not found); "
                             "check the path, or create it with an extraction (`out`)")
        store = cls(url, storage_options, mode, fs, root, found.plan, found.manifest, found.generation)
        if generation is not None and found.generation != generation:
            raise store._replaced(generation, found.generation)
        return store

    def _fresh_status(self) -> StoreStatus:
        return StoreStatus.PLANNED if self.generation is not None else StoreStatus.PLANNING

    def _build_manifest(self, status: StoreStatus, valid_rows: int | None = None,
                        records: tuple[dict, dict] | None = None) -> dict:
        if records is None:
            records = self.records.by_kind() if self.generation is not None else ({}, {})
        commits, failures = records
        return mf.build_manifest(config=self._plan["config"], layers=self._plan["layers"], shards=self.shards,
                                 storage=self._plan["storage"], status=status, commits=commits, failures=failures,
                                 valid_rows=valid_rows, created=self._plan.get("created"),
                                 software=self._plan.get("software"), generation=self.generation)

    def _check_generation(self) -> None:
        """Raise if the store was replaced since this object opened it (another run's overwrite)."""
        current, _damaged = fsx.read_json(self._fs, f"{self._root}/{GENERATION}")  # every few seconds per writer
        now = (current or {}).get("generation")
        if now != self.generation:
            raise self._replaced(self.generation, now)

    def _replaced(self, ours: str | None, now: str | None) -> StoreError:
        return StoreError(f"the store at {redact_text(self._url)!r} was replaced by another run (generation {ours} "
                          f"-> {now}) while this one was writing: this run's rows are discarded and nothing of it "
                          "is committed there.")

    def zarr_store(self) -> Any:
        """The zarr store object under this run's folder (read-only when opened with mode 'r')."""
        if self._zstore is None:
            read_only = self._mode == "r"
            if fsx.is_local(self._fs):
                self._zstore = zarr.storage.LocalStore(self._root, read_only=read_only)
            else:
                self._zstore = zarr.storage.FsspecStore.from_url(
                    self._url, storage_options=fsx.with_defaults(self._url, self._storage_options), read_only=read_only)
                fsx.tuned(self._zstore.fs)
        return self._zstore

    def array(self, path: str) -> Any:
        """The zarr array at path, opened once per FeatureStore (metadata is fixed after create)."""
        with self._lock:
            arr = self._arrays.get(path)
        if arr is None:
            try:
                arr = zarr.open_array(self.zarr_store(), path=path, mode="r" if self._mode == "r" else "r+",
                                      zarr_format=3)
            except Exception as exc:  # its zarr.json damaged or lost: say so, and how to repair it
                why = self.damaged_metadata().get(f"{path}/{metadata.ZARR_JSON}")
                if why is None:
                    raise
                raise StoreError(f"{path}/{metadata.ZARR_JSON} of the store at {redact_text(self._url)!r} is {why}: "
                                 "its rows cannot be read or written. Run the same extraction with verify "
                                 "(--verify) to write it again from the plan; the rows are kept.") from exc
            with self._lock:
                arr = self._arrays.setdefault(path, arr)
        return arr

    # -- what the plan says -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    def unreachable(self) -> str | None:
        """Why the store cannot be read now (an outage, lost access, its disk gone), or None: one look at its
        manifest, which every planned store has. A store that answers, if slowly (throttled), is reachable."""
        try:
            self._fs.info(f"{self._root}/{MANIFEST}")
        except FileNotFoundError:
            return f"the output store {redact_text(self._url)} has no {MANIFEST} any more: it was deleted, or its " \
                   "disk is not mounted"
        except Exception as exc:
            return fsx.outage(self._url, exc, "the output store")
        return None

    @property
    def manifest(self) -> dict:
        """The manifest as last read or written by this object (not re-read from the store)."""
        return self._manifest

    @property
    def config(self) -> dict:
        return self._plan["config"]

    @property
    def shards(self) -> list[Shard]:
        """The plan: every shard with its count and offset. From `create`: the shards it was given, where the
        corpus is now (they match the plan by name, count and offset); from `open`: as the plan recorded them
        (URLs with credentials redacted, where the corpus was then: read shards from `list_shards` instead)."""
        if self._shards is None:
            self._shards = [mf.plan_shard(e) for e in self._plan["shards"]]
        return list(self._shards)

    @property
    def layers(self) -> list[LayerSpec]:
        return metadata.layers_of(self._plan)

    @property
    def dtype(self) -> str:
        return self._plan["storage"]["dtype"]

    @property
    def chunk_rows(self) -> dict[str, int]:
        """Rows per chunk of each array, by array path (`features/<layer>`, `keys`, `valid`)."""
        return dict(self._plan["storage"]["chunk_rows"])

    @property
    def rows(self) -> int:
        return int(self._plan["storage"]["rows"])

    @property
    def staging(self) -> Staging:
        return Staging(self._fs, self._root, self.chunk_rows, self.rows)

    # -- status records -------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"{redact_text(self._url)!r} was opened read-only (mode='r')")
        if self.generation is None:
            raise StoreError(f"the store at {redact_text(self._url)!r} was never completely planned (interrupted); "
                             "plan it again: run the same extraction")

    def planned(self, shard: Shard) -> Shard:
        """The store's own record of a shard the caller names (count and offset must agree)."""
        if self._by_name is None:  # one dict, not a scan of every shard per writer (100,000 shards: 2 ms each)
            self._by_name = {s.name: s for s in self.shards}
        s = self._by_name.get(shard.name)
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

    def committed(self, shard_names: Collection[str] | None = None) -> dict[str, dict]:
        """Shard name -> commit record, for every committed shard (one listing, not a request per shard), or
        for those of `shard_names` only (one read each, no listing)."""
        return self.records.by_kind()[0] if shard_names is None else self.records.commits_of(shard_names)

    def content_id(self, commits: Mapping[str, dict] | None = None) -> str:
        """What the store's rows are, hashed: its generation (a new one when the store is replaced) and the
        commit of each shard (a shard extracted again in place, after its images changed or `verify` found it
        damaged, holds other rows). `commits`: the commit records, where the caller has read them."""
        commits = self.committed() if commits is None else commits
        rows = sorted((name, str(rec.get("committed_at"))) for name, rec in commits.items())
        return hashlib.sha256(mf.canonical_json({"generation": self.generation, "commits": rows}).encode()).hexdigest()

    def current_status(self) -> StoreStatus:
        """The store's status now: a finalized manifest stands while the commit records are those it sealed
        (one listing); once a resume or a withdrawal changed them, the store is 'planned' again until the
        next finalize."""
        status = StoreStatus(self._manifest.get("status", self._fresh_status()))
        if status == StoreStatus.PLANNING and self.generation is not None:
            return StoreStatus.PLANNED  # its plan wrote the generation (last), then died before its manifest
        return StoreStatus.PLANNED if status.finalized and not self._commits_sealed() else status

    def status_manifest(self) -> dict:
        """The manifest with every shard's current status, read from the commit and failure records: what
        a finalize would write now, without writing anything (for a running or interrupted run, or a store
        changed since its finalize: see current_status)."""
        status = self.current_status()
        if status.finalized and not self.repairs:
            return self._manifest
        return self._build_manifest(status)

    def _commits_sealed(self) -> bool:
        """Whether the records are those the finalized manifest sealed: the same commit records, none
        written after the manifest (one listing, one info)."""
        fsx.invalidate(self._fs, self.records.folder)
        try:
            infos = [i for i in self._fs.ls(self.records.folder, detail=True) if i["name"].endswith(".json")]
            sealed_at = fsx.modified(self._fs.info(f"{self._root}/{MANIFEST}"))
        except FileNotFoundError:
            return False
        listed = {fsx.basename(i["name"]) for i in infos if not i["name"].endswith(".failed.json")}
        sealed = {fsx.basename(self.records.path(s["name"])) for s in self._manifest.get("shards", [])
                  if s.get("status") == ShardStatus.COMMITTED}
        newer = [i["name"] for i in infos if (fsx.modified(i) or 0.0) > (sealed_at or 0.0)]
        return listed == sealed and (not newer or self._sealed_records(newer))

    def _sealed_records(self, paths: list[str]) -> bool:
        """Whether records that look newer than the manifest are those it sealed, by what they hold: a
        copied store (cp -r, aws s3 sync) gets new modification times in any order, and a shard committed or
        failed again since holds other times and measurements."""
        entries = {s["name"]: s for s in self._manifest.get("shards", [])}
        blobs = self._fs.cat(paths, on_error="omit")
        for blob in blobs.values():
            try:
                rec = json.loads(blob)
            except ValueError:  # damaged since: not what was sealed
                return False
            entry = entries.get(rec.get("shard"), {})
            if rec.get("kind") != KIND_COMMIT and entry.get("status") == ShardStatus.COMMITTED:
                continue  # a failure before the commit the manifest sealed (a commit outranks it)
            # times have second precision: with the run's own measurements, a record written again differs
            fields = ("committed_at", "duration_s", "stages", "pid") if rec.get("kind") == KIND_COMMIT else (
                "failed_at", "attempts")
            if rec.get(fields[0]) is None or any(rec.get(f) != entry.get(f) for f in fields):
                return False
        return len(blobs) == len(paths)

    # -- writing ------------------------------------------------------------------------------

    def claim(self, shard: Shard) -> locks.Lease:
        """This run's claim on extracting `shard`: a lease (`_locks/shards/<shard>.json`, a context manager),
        so that runs sharing the store never write one shard at once (rows a second writer wrote after the
        first one's commit differed from its checksums, and finalize deleted rows the second had staged).
        Raises ShardBusy, naming the holder, while another live run holds it. The claim reports the shard's
        progress (set its `progress`): a holder whose rows stopped advancing is taken over (`locks.stuck`)."""
        self._require_writable()
        got = locks.try_acquire(self._fs, f"{self._root}/{CLAIMS_DIR}/{safe_name(shard.name)}.json",
                                f"extracting {shard.name}", progress=True)
        if not isinstance(got, locks.Lease):
            raise ShardBusy(shard.name, got)
        return got

    def check_config(self, config: dict) -> None:
        """Raise ConfigMismatchError unless `config` (what a worker loaded: `pipeline.identity`) is the one the
        store was planned with: a checkpoint, model folder or model file replaced during a run is reloaded by
        the workers, and its rows must not join the old model's."""
        diffs = config_diffs(self.config, mf.redact(mf.canonical(config)))
        if diffs:
            raise ConfigMismatchError(
                f"the model loaded now differs from the one the store {redact_text(self._url)!r} was planned with:\n  "
                + "\n  ".join(diffs) + "\nIts file changed during the run (a checkpoint saved again, a model file "
                "edited). Put the original back and run again, or start over with overwrite=True.")

    def writer(self, shard: Shard, *, replace_commit: bool = True, claim: locks.Lease | None = None) -> ShardWriter:
        """A writer for one attempt at a shard (see `ShardWriter`). Opens the arrays with mode r+ (never
        re-creates them). Withdraws an earlier commit of the shard (its rows are about to be rewritten,
        so they are no longer trusted); with replace_commit=False, a committed shard raises ShardCommitted
        instead (another run committed it since this one looked: its commit must stand). Its staged rows go
        to a folder of this attempt's own; finalize merges the committed attempt's and deletes the others.
        `claim`: the shard's (`claim`); the writer stops, before its next write, once it is lost or runs out
        (a machine suspended past it), and its commit then also never replaces another run's."""
        self._require_writable()
        shard = self.planned(shard)
        self._check_generation()
        if not replace_commit and self.is_committed(shard.name):
            raise ShardCommitted(f"shard {shard.name} was committed by another run")
        self.records.withdraw(shard.name)

        def fence(full: bool) -> None:  # a replaced store, or a claim another run took over: nothing more written
            if claim is not None and (full or not claim.valid_now()):
                claim.check()
            if full:
                self._check_generation()

        return ShardWriter(shard, {path: self.array(path) for path in self.chunk_rows}, self.layers, self.dtype,
                           self.chunk_rows, self.rows, self.staging, self.records, fence,
                           exclusive_commit=not replace_commit)

    def record_failure(self, shard: Shard, error: str, attempts: int) -> None:
        """Keep the shard's last error (`_status/<shard>.failed.json`); the shard stays uncommitted."""
        self._require_writable()
        self.records.write_failure(self.planned(shard), error, attempts)

    def session(self, what: str = "extracting") -> locks.Lease:
        """A lease saying that a run is extracting into this store (held until released; a context
        manager): replacing the store is refused while one is alive."""
        self._require_writable()
        run_id = locks.new_run_id()
        return locks.register(self._fs, f"{self._root}/{RUNS_DIR}/{run_id}.json", what, run_id)

    def extracting(self) -> list[dict]:
        """The shards runs are extracting now: their live claims (run, host, pid, rows written...)."""
        return locks.live(self._fs, f"{self._root}/{CLAIMS_DIR}")

    def shared(self, session: locks.Lease) -> bool:
        """Whether runs other than `session`'s are extracting into the store now."""
        return any(lease.get("run_id") != session.run_id for lease in locks.live(self._fs, f"{self._root}/{RUNS_DIR}"))

    # -- integrity ----------------------------------------------------------------------------

    def damaged_metadata(self) -> dict[str, str]:
        """The zarr metadata files (`zarr.json` of a group or array) that are missing, damaged, or differ
        from the plan: path -> what is wrong. `repair_metadata` rewrites them."""
        if self._metadata_docs is None:  # made once per object: the plan does not change
            self._metadata_docs = metadata.planned(self._plan)
        return metadata.damaged(self._fs, self._root, self._metadata_docs)

    def repair_metadata(self) -> dict[str, str]:
        """Write the damaged zarr metadata files (`damaged_metadata`) again from the plan, and return them
        (also kept in `metadata_rewritten`). The chunks are kept: `verify` then tells whether the rows read
        back as written. The next finalize consolidates the metadata again."""
        self._require_writable()
        damaged = self.damaged_metadata()
        metadata.rewrite(self._fs, self._root, self._metadata_docs, damaged)
        self.metadata_rewritten.update(damaged)
        with self._lock:
            self._arrays.clear()
        return damaged

    def verify(self, commits: Mapping[str, dict] | None = None) -> dict[str, str]:
        """Read every committed shard's rows and compare them with the checksums of its commit record
        (`commits`: the records to check, where the caller has read them); returns shard name -> what is
        wrong, for the damaged ones. An array whose metadata is damaged (`damaged_metadata`) is not read:
        its chunks may well be intact."""
        commits = self.committed() if commits is None else commits
        staged = self.staging
        unreadable = self.damaged_metadata()
        damaged: dict[str, str] = {}
        for shard in self.shards:
            rec = commits.get(shard.name)
            if rec is None:
                continue
            sums = rec.get("checksums") or {}
            for path in self.chunk_rows:
                if f"{path}/{metadata.ZARR_JSON}" in unreadable:
                    continue
                if path not in sums:
                    damaged[shard.name] = f"{path}: no checksum in its commit record (written by an older version)"
                    break
                try:
                    digest = RowDigest()
                    digest.update(staged.rows_as_stored(shard, path, self.array(path), rec.get("staging")))
                except Exception as exc:  # an unreadable chunk is damage too
                    damaged[shard.name] = f"{path}: cannot read its rows ({type(exc).__name__}: {exc})"
                    break
                if digest.hexdigest() != sums[path]:
                    damaged[shard.name] = f"{path}: rows differ from what was written (checksum mismatch)"
                    break
        return damaged

    def withdraw(self, damaged: Mapping[str, str]) -> None:
        """Take back the commits of damaged shards (name -> why), so that the next run extracts them again;
        the reason is kept as their failure record."""
        self._require_writable()
        self.withdrawn.update(damaged)
        for shard in self.shards:
            if shard.name in damaged:
                self.records.withdraw(shard.name)
                self.records.write_failure(shard, f"damaged: {damaged[shard.name]}", attempts=0)

    # -- finalize -----------------------------------------------------------------------------

    def finalize(self, wait_s: float = _FINALIZE_WAIT_S) -> dict:
        """Merge staged boundary rows of committed shards into the real chunks, merge commit records
        (and failure records) into manifest.json (status 'complete' if every shard committed, else
        'partial'), consolidate zarr metadata, return the manifest. Idempotent; one finalize at a time
        (the finalize lease), since it is the only writer of shared chunks.
        """
        self._require_writable()
        with locks.acquire(self._fs, f"{self._root}/{LOCKS_DIR}/{_FINALIZE_LOCK}", "finalizing", wait_s) as lease:
            self._check_generation()
            records = self.records.by_kind()  # read once: a request per shard
            commits = records[0]
            shards = self.shards
            lease.check()  # the shared chunks are written next
            self.staging.merge(shards, {name: rec.get("staging") for name, rec in commits.items()}, self.array)
            valid_rows = self.valid_rows(commits)
            complete = all(s.name in commits for s in shards)
            zs = self.zarr_store()
            with quiet_zarr():
                zarr.consolidate_metadata(zs, path=FEATURES)
                zarr.consolidate_metadata(zs)
            manifest = self._build_manifest(StoreStatus.COMPLETE if complete else StoreStatus.PARTIAL, valid_rows,
                                            records)
            # one folder of shards had its keys checked at plan or by the `shards make` that wrote its
            # index.json; shards of several folders are checked here, once their keys are written
            several_folders = len({fsx.parent(s.url) for s in shards}) > 1
            if complete and several_folders and (dupes := self._duplicate_keys()):
                manifest["duplicate_keys"] = dupes
            # Written last: 'complete' in the manifest means the data and the metadata are sealed.
            lease.check()
            fsx.write_json_atomic(self._fs, f"{self._root}/{MANIFEST}", manifest)
            self._clear_dead()
        self._manifest = manifest
        self.repairs.clear()
        return manifest

    def _clear_dead(self) -> None:
        """Remove what killed runs left behind: their leases and run records, spent take-over markers and
        temporary files (they would pile up, one per shard a killed run was extracting)."""
        with contextlib.suppress(Exception):  # a leftover costs a few bytes; failing here would hide the manifest
            for folder, exclusive in ((CLAIMS_DIR, True), (LOCKS_DIR, True), (RUNS_DIR, False)):
                locks.clear_dead(self._fs, f"{self._root}/{folder}", exclusive)

    def _duplicate_keys(self, shown: int = 20) -> dict:
        """Keys that more than one row carries (shards packed apart can share names: plan checks only the
        shards it scans), as {"count": n, "examples": {key: [rows]}}; {} when all differ. Reads every key."""
        with quiet_zarr():
            keys = np.asarray(zarr.open_array(self.zarr_store(), path=KEYS, mode="r")[:], dtype=object)
        values, counts = np.unique(keys, return_counts=True)
        repeated = values[counts > 1]
        if not len(repeated):
            return {}
        examples = {str(k): [int(r) for r in np.flatnonzero(keys == k)] for k in repeated[:shown]}
        return {"count": int(len(repeated)), "examples": examples}

    def valid_rows(self, commits: Mapping[str, dict]) -> int:
        """Valid rows of the committed shards (`commits`: their records): as each writer counted the valid
        flags it stored (its commit record's stats); the rows of shards whose record lacks that count (older
        versions) are read."""
        committed = [s for s in self.shards if s.name in commits]
        counted = [commits[s.name].get("stats", {}).get("valid") for s in committed]
        total = sum(int(c) for c in counted if isinstance(c, int))
        unread = [s for s, c in zip(committed, counted) if not isinstance(c, int)]
        if unread:
            valid = self.array(VALID)[:]
            total += int(sum(valid[s.offset:s.end].sum() for s in unread))
        return total


def _restore_generation(fs: Any, root: str, url: str, found: _Found, lease: locks.Lease) -> str | None:
    """The generation of a store whose `_generation.json` is lost or damaged, written back: the one its
    manifest or its commit records name for this plan; None where neither names one (a plan step that was
    interrupted before it: no shard can have committed), or where a group or array is gone (a replacement
    deletes the generation first, then the rest: one killed half-way left a store that is planned again)."""
    # the groups and arrays: a replacement deletes the groups early
    if not all(fs.exists(f"{root}/{path}{metadata.ZARR_JSON}") for path in metadata.node_paths(found.plan)):
        return None
    config_hash = found.plan.get("config_hash")
    named = [found.manifest] if found.manifest and found.manifest.get("config_hash") == config_hash else []
    if not named:
        records = Records(fs, root, None, None)
        paths = [p for p in fsx.listing(fs, records.folder) if p.endswith(".json")]
        named = [rec for p in paths[:16] if (rec := fsx.read_json(fs, p)[0]) and rec.get("config_hash") == config_hash]
    generation = next((obj["generation"] for obj in named if obj.get("generation")), None)
    if generation is not None:
        lease.check()
        fsx.write_json_atomic(fs, f"{root}/{GENERATION}", {"generation": generation, "config_hash": config_hash})
        log.warning("the store at %s had lost its %s: restored from its %s (its commits are kept)",
                    redact_text(url), GENERATION, "manifest" if found.manifest in named else "commit records")
    return generation


class _Found:
    """What is at a store's URL: its plan (`_plan.json`, or the manifest of a store from before plans
    were kept apart), its manifest (None when missing or damaged) and its generation."""

    def __init__(self, plan: dict | None, manifest: dict | None, generation: str | None) -> None:
        self.plan, self.manifest, self.generation = plan, manifest, generation

    @classmethod
    def read(cls, fs: Any, root: str, url: str) -> _Found:
        plan, plan_damaged = fsx.read_json(fs, f"{root}/{PLAN}")
        manifest, manifest_damaged = fsx.read_json(fs, f"{root}/{MANIFEST}")
        gen, _ = fsx.read_json(fs, f"{root}/{GENERATION}")
        for name, obj in ((PLAN, plan), (MANIFEST, manifest)):
            if obj is not None and obj.get("format") != mf.FORMAT:
                raise StoreError(f"{redact_text(url)!r}: {name} has format {obj.get('format')!r}, expected "
                                 f"{mf.FORMAT!r}; it was not written by this version of neuropredictor")
        generation = gen.get("generation") if gen else None
        if plan is None and manifest is not None and "config_hash" in manifest:  # a store from before plans
            plan = {k: manifest[k] for k in ("format", "config", "config_hash", "layers", "storage", "shards",
                                             "created", "software") if k in manifest}
            generation = manifest.get("generation")
        if plan is None and plan_damaged:
            raise StoreError(f"the store at {redact_text(url)!r} is damaged: its {PLAN}"
                             + (f" and {MANIFEST} are" if manifest_damaged or manifest is None else " is")
                             + " unreadable, so its plan is lost. Replace it (overwrite=True) or choose another `out`.")
        return cls(plan, None if manifest_damaged else manifest, generation)


def plan_shards(url: str, storage_options: dict | None = None) -> list[Shard]:
    """The shards of the plan of the store at url, reading only its plan; none when there is none."""
    fs, root = fsx.connect(url, storage_options, error=StoreError, what="store")
    plan, _damaged = fsx.read_json(fs, f"{root}/{PLAN}")
    return [mf.plan_shard(e) for e in (plan or {}).get("shards", [])]


def _entries(fs: Any, root: str) -> list[str]:
    return sorted(fsx.basename(p) for p in fsx.listing(fs, root))


def refuse_foreign(fs: Any, root: str, url: str) -> None:
    """A folder with things in it that are not a store's is never written to (nor emptied)."""
    entries = [fsx.published_name(e) for e in _entries(fs, root)]
    ours = {*STORE_ENTRIES, LOCKS_DIR}
    if entries and not ({MANIFEST, PLAN} & set(entries)) and not set(entries) <= ours:
        shown = ", ".join(e for e in entries if e not in ours)[:200]
        raise StoreError(f"{redact_text(url)!r} is not empty and holds no neuropredictor store ({shown}); refusing "
                         "to write there or to delete anything. Choose another `out`, or empty it yourself.")


def _delete_store(fs: Any, root: str, found: _Found) -> dict:
    """Delete a store's own objects (the manifest first, so that a deletion killed half-way never leaves a store
    that reads as complete; then the generation, so that a late writer of the old store stops; a store killed
    half-way is resumed, or planned again, by its own config), leave anything else in the folder alone; return
    what was deleted."""
    entries = _entries(fs, root)
    old = Records(fs, root, found.generation, found.plan.get("config_hash"))
    commits = old.by_kind()[0] if found.generation is not None else {}
    deleted = [e for e in dict.fromkeys((MANIFEST, GENERATION, *STORE_ENTRIES)) if e in entries]
    for name in deleted:
        fsx.remove_tree(fs, f"{root}/{name}")
    return {"generation": found.generation, "config_hash": found.plan.get("config_hash"),
            "committed_shards": len(commits), "shards": len(found.plan.get("shards", [])),
            "rows": found.plan.get("storage", {}).get("rows"), "deleted": sorted(deleted),
            "kept": [e for e in entries if e not in (*STORE_ENTRIES, LOCKS_DIR)]}


_RECORDED_SINCE = ("code",)  # config fields older stores lack: they resume as they are


def config_diffs(stored: dict, requested: dict) -> list[str]:
    """`config.field: stored=... requested=...` lines between a stored config and a requested one (both
    redacted and canonical)."""
    requested = {k: v for k, v in requested.items() if k in stored or k not in _RECORDED_SINCE}
    return [f"config.{d}" if not d.startswith("<") else f"config: {d.split(': ', 1)[1]}"
            for d in mf.diff_configs(stored, requested)]


def plan_diffs(existing: dict, requested: dict) -> list[str]:
    """`field: stored=... requested=...` lines between a stored plan and a requested one."""
    diffs = config_diffs(existing.get("config", {}), requested["config"])
    stored_layers = {d["name"]: d for d in existing.get("layers", [])}
    req_layers = {d["name"]: d for d in requested["layers"]}
    layer_diffs = [f"layers.{name}: stored={_shown(stored_layers.get(name))} requested={_shown(req_layers.get(name))}"
                   for name in sorted(set(stored_layers) | set(req_layers))
                   if stored_layers.get(name) != req_layers.get(name)]
    if not layer_diffs and list(stored_layers) != list(req_layers):
        layer_diffs.append(f"layers: stored={mf.short(list(stored_layers))} requested={mf.short(list(req_layers))} "
                           "(order)")
    diffs += layer_diffs
    stored_storage = existing.get("storage", {})
    diffs += [f"{field}: stored={mf.short(stored_storage.get(field))} requested={mf.short(requested['storage'][field])}"
              for field in ("dtype", "compression", "chunk_bytes")
              if stored_storage.get(field) != requested["storage"][field]]
    a = [{"name": e["name"], "count": e["count"], "offset": e["offset"]} for e in existing.get("shards", [])]
    b = [{"name": e["name"], "count": e["count"], "offset": e["offset"]} for e in requested["shards"]]
    if a != b:
        diffs.append(f"shards: stored={len(a)} shards/{sum(p['count'] for p in a)} rows "
                     f"requested={len(b)} shards/{sum(p['count'] for p in b)} rows")
        diffs += [f"shards[{i}]: stored={_shown(pa)} requested={_shown(pb)}"
                  for i, (pa, pb) in enumerate(itertools.zip_longest(a, b)) if pa != pb][:5]
    return diffs


def _shown(value: Any) -> str:
    return mf.short(value) if value else "<missing>"
