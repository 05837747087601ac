"""Commit and failure records: `_status/<shard>.json` says a shard's rows are complete and trusted;
`_status/<shard>.failed.json` keeps its last error. A shard's rows count only through its commit record,
written after all of its data, in one atomic write (a single PUT or rename): absent or complete.

Every record names the store generation and config hash it was written for, and only records of the
store's current generation count: a run still writing into a store that was replaced meanwhile can never
commit into the new one. A damaged record (truncated, unreadable) counts as absent: its shard runs again.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor import manifest as mf
from neuropredictor.errors import StoreError
from neuropredictor.redact import redact, redact_text
from neuropredictor.shard import Shard
from neuropredictor.store.layout import STATUS_DIR, safe_name

KIND_COMMIT = "commit"
KIND_FAILURE = "failure"
_MAX_ERROR_CHARS = 4000


class ShardCommitted(StoreError):
    """A shard another run has committed meanwhile (`FeatureStore.writer(replace_commit=False)`): its commit
    stands."""


class Records:
    """The `_status/` folder of one store generation."""

    def __init__(self, fs: Any, root: str, generation: str | None, config_hash: str | None) -> None:
        self._fs, self._root = fs, root
        self.generation, self.config_hash = generation, config_hash

    def _ours(self, rec: Any, kind: str, shard_name: str | None = None) -> bool:
        return (isinstance(rec, dict) and rec.get("kind") == kind and isinstance(rec.get("shard"), str)
                and (shard_name is None or rec["shard"] == shard_name)
                and rec.get("generation") == self.generation
                and (self.generation is None or rec.get("config_hash") == self.config_hash))

    @property
    def folder(self) -> str:
        return f"{self._root}/{STATUS_DIR}"

    def path(self, shard_name: str, failed: bool = False) -> str:
        name = safe_name(shard_name)
        if name.endswith(".failed"):  # `<x>.failed.json` is shard x's failure record: not this shard's commit
            name = name[: -len(".failed")] + "%2Efailed"
        return f"{self.folder}/{name}{'.failed' if failed else ''}.json"

    def commit_record(self, shard_name: str) -> dict | None:
        """The shard's commit record, or None if it has none."""
        rec, _damaged = fsx.read_json(self._fs, self.path(shard_name))  # damaged: not committed
        return rec if self._ours(rec, KIND_COMMIT, shard_name) else None

    def by_kind(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """(commits, failures) by shard name, from one listing of _status/ and concurrent reads."""
        paths = [p for p in fsx.listing(self._fs, self.folder) if p.endswith(".json")]
        commits: dict[str, dict] = {}
        failures: dict[str, dict] = {}
        if not paths:
            return commits, failures
        for blob in self._fs.cat(paths, on_error="omit").values():  # concurrent GETs on object stores
            with contextlib.suppress(ValueError):  # a damaged record counts as absent
                rec = json.loads(blob)
                if self._ours(rec, KIND_COMMIT):
                    commits[rec["shard"]] = rec
                elif self._ours(rec, KIND_FAILURE):
                    failures[rec["shard"]] = rec
        return commits, failures

    def commits_of(self, shard_names: Iterable[str]) -> dict[str, dict]:
        """The commit records of these shards only (concurrent reads, no listing): a child run of a
        distributed extraction needs its own group's, not the store's."""
        paths = {self.path(name): name for name in shard_names}
        found: dict[str, dict] = {}
        for path, blob in (self._fs.cat(list(paths), on_error="omit") if paths else {}).items():
            with contextlib.suppress(ValueError):  # a damaged record counts as absent
                rec = json.loads(blob)
                name = paths.get(path) or paths.get(self._fs._strip_protocol(path))
                if name is not None and self._ours(rec, KIND_COMMIT, name):
                    found[name] = rec
        return found

    def withdraw(self, shard_name: str) -> None:
        """Remove a shard's commit record: its rows are about to be rewritten, so no longer trusted."""
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self.path(shard_name))

    def write_commit(self, shard: Shard, record: Mapping, stats: Mapping | None = None,
                     exclusive: bool = False) -> dict:
        """Write the shard's commit record (credentials redacted); returns what was written. `exclusive`:
        only if the shard has none (an atomic create), else ShardCommitted.

        record: whatever the caller wants kept (attempts, duration_s, device, host, images_per_s,
        bad_samples=[{key, reason}], valid=<count>...).
        """
        rec: dict[str, Any] = {"kind": KIND_COMMIT, "shard": shard.name, "offset": int(shard.offset),
                               "count": int(shard.count), "committed_at": mf.now_iso(), "host": socket.gethostname(),
                               "generation": self.generation, "config_hash": self.config_hash}
        rec.update({k: v for k, v in redact(dict(record)).items() if k not in (*rec, "bad_samples")})
        rec["bad_samples"] = mf.bad_samples(record, shard.name)
        if stats is not None and "stats" not in rec:
            rec["stats"] = dict(stats)
        if not exclusive:
            fsx.write_json_atomic(self._fs, self.path(shard.name), rec)
        elif not fsx.create_exclusive(self._fs, self.path(shard.name), fsx.json_bytes(rec)):
            raise ShardCommitted(f"shard {shard.name} was committed by another run")
        return rec

    def write_failure(self, shard: Shard, error: str, attempts: int) -> None:
        rec = {"kind": KIND_FAILURE, "shard": shard.name, "offset": int(shard.offset), "count": int(shard.count),
               "error": redact_text(str(error))[:_MAX_ERROR_CHARS], "attempts": int(attempts),
               "failed_at": mf.now_iso(), "host": socket.gethostname(), "generation": self.generation,
               "config_hash": self.config_hash}
        fsx.write_json_atomic(self._fs, self.path(shard.name, failed=True), rec)
