"""The run record: config and its hash, shard statuses, bad samples, software versions.

Plain functions over plain dicts, so the record can be built, read and diffed without zarr, torch or
a store object. Everything that ends up in `manifest.json` or in a commit record goes through
`redact` first: storage options, tokens and passwords must never be written next to the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from neuropredictor.fs import json_default
from neuropredictor.redact import redact, redact_text
from neuropredictor.shard import Shard
from neuropredictor.status import ShardStatus

FORMAT = "neuropredictor-store/1"

# Distributions reported in the manifest, under the name the manifest uses.
_SOFTWARE = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "open_clip": "open_clip_torch",
    "transformers": "transformers",
    "zarr": "zarr",
    "numpy": "numpy",
    "xarray": "xarray",
    "fsspec": "fsspec",
    "s3fs": "s3fs",
    "pillow": "pillow",
    "neuropredictor": "neuropredictor",
}

# Commit-record fields that the manifest's shard entry takes over itself; any other field of a
# commit record (images_per_s, stats, committed_at...) is passed through unchanged.
_SHARD_FIELDS = ("name", "url", "count", "offset", "status", "attempts", "duration_s", "device", "host", "error")
_RECORD_INTERNAL = {"kind", "shard", "bad_samples", "generation", "config_hash", "checksums", "staging"}


def now_iso() -> str:
    """Current UTC time, second precision, ISO 8601 (what every timestamp in the store uses)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical(obj: Any) -> Any:
    """obj as it reads back from JSON (tuples -> lists, numpy -> Python), so stored and requested compare equal."""
    return json.loads(json.dumps(obj, default=json_default))


def canonical_json(obj: Any) -> str:
    """Deterministic compact JSON: sorted keys, no whitespace, UTF-8 text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)


def config_hash(config: dict) -> str:
    """sha256 (hex) of the redacted config as canonical JSON.

    Redacted first so that the hash can be recomputed from the manifest and a rotated credential does
    not count as a different run.
    """
    return hashlib.sha256(canonical_json(redact(canonical(config))).encode("utf-8")).hexdigest()


def short(value: Any, limit: int = 200) -> str:
    text = canonical_json(value) if value is not _MISSING else "<missing>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MISSING = object()


def diff_configs(stored: Any, requested: Any, prefix: str = "") -> list[str]:
    """Differences between two configs as `dotted.path: stored=... requested=...` lines (JSON values).

    Nested dicts are compared key by key; anything else (lists included) is compared as a whole.
    Both sides are canonicalised first, so a tuple and the list it was stored as are equal.
    """
    if prefix == "":
        stored, requested = canonical(stored), canonical(requested)
    if isinstance(stored, dict) and isinstance(requested, dict):
        out: list[str] = []
        for k in sorted(set(stored) | set(requested), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            out += diff_configs(stored.get(k, _MISSING), requested.get(k, _MISSING), path)
        return out
    if stored is _MISSING and requested is _MISSING or stored == requested:
        return []
    return [f"{prefix or '<config>'}: stored={short(stored)} requested={short(requested)}"]


def software_versions() -> dict[str, str]:
    """Python and the versions of the installed packages that shape the output (metadata only, no imports)."""
    out = {"python": platform.python_version()}
    for name, dist in _SOFTWARE.items():
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(dist)
    if "neuropredictor" not in out:  # running from a source checkout that was never pip-installed
        with contextlib.suppress(Exception):
            import neuropredictor  # light: the package imports its parts lazily

            out["neuropredictor"] = str(neuropredictor.__version__)
    return out


# ---------------------------------------------------------------------------------------------
# The manifest


def bad_samples(record: Mapping, shard_name: str) -> list[dict]:
    # Sample keys are data, not credentials: built field by field instead of going through redact
    # (which would blank every `key`). The reason text still loses URL passwords.
    out = []
    for item in record.get("bad_samples") or []:
        if isinstance(item, Mapping):
            key, reason = item.get("key"), item.get("reason", "")
        else:
            key, reason = item, ""
        out.append({"key": None if key is None else str(key), "shard": shard_name,
                    "reason": redact_text(str(reason))})
    return out


def plan_entry(shard: Shard) -> dict[str, Any]:
    """A shard as the plan records it."""
    entry: dict[str, Any] = {"name": shard.name, "url": redact_text(str(shard.url)), "count": int(shard.count),
                             "offset": int(shard.offset)}
    if shard.size is not None:
        entry.update(size=shard.size, etag=shard.etag)
    if shard.scanned:
        entry["scanned"] = True
    return entry


def plan_shard(entry: Mapping) -> Shard:
    """A shard from its plan entry (the inverse of `plan_entry`)."""
    return Shard(url=entry.get("url", ""), name=entry["name"], count=int(entry["count"]), offset=int(entry["offset"]),
                 size=entry.get("size"), etag=entry.get("etag"), scanned=bool(entry.get("scanned")))


def shard_entry(shard: Shard, commit: Mapping | None = None, failure: Mapping | None = None) -> dict:
    """The manifest's entry for one shard, from its plan and its commit / failure records (if any)."""
    entry = plan_entry(shard)
    failed_attempts = int(failure.get("attempts") or 0) if failure else 0
    if commit is not None:
        # internal fields left out before redaction: a record's bad samples and checksums are most of its size
        rec = redact({k: v for k, v in commit.items() if k not in _RECORD_INTERNAL})
        entry["url"] = (rec.get("source") or {}).get("url", entry["url"])  # where its rows were read from
        entry.update(status=ShardStatus.COMMITTED, attempts=rec.get("attempts") or failed_attempts + 1,
                     duration_s=rec.get("duration_s"), device=rec.get("device"), host=rec.get("host"),
                     error=None)
        entry.update({k: v for k, v in rec.items() if k not in _SHARD_FIELDS})
    elif failure is not None:
        rec = redact(dict(failure))
        entry.update(status=ShardStatus.FAILED, attempts=failed_attempts, duration_s=rec.get("duration_s"),
                     device=rec.get("device"), host=rec.get("host"), error=rec.get("error"))
        if rec.get("failed_at"):
            entry["failed_at"] = rec["failed_at"]
    else:
        entry.update(status=ShardStatus.PENDING, attempts=0, duration_s=None, device=None, host=None, error=None)
    return entry


def build_manifest(
    *,
    config: dict,
    layers: Iterable[Mapping],
    shards: Iterable[Any],
    status: str,
    storage: Mapping | None = None,
    commits: Mapping[str, Mapping] | None = None,
    failures: Mapping[str, Mapping] | None = None,
    valid_rows: int | None = None,
    created: str | None = None,
    software: Mapping | None = None,
    generation: str | None = None,
) -> dict:
    """The whole run record, ready for `write_json_atomic`.

    layers: dicts with name, shape, dtype, reduction. shards: objects with url, name, count, offset
    (the plan). commits / failures: shard name -> record. valid_rows: number of valid rows among the
    committed ones, when the caller counted them in the data; otherwise taken from the records
    (a record's `valid` field, else count minus its bad samples).
    """
    commits, failures = commits or {}, failures or {}
    config = redact(canonical(config))
    shards = list(shards)
    entries = [shard_entry(s, commits.get(s.name), failures.get(s.name)) for s in shards]
    bad = [b for s in shards if s.name in commits for b in bad_samples(commits[s.name], s.name)]
    committed_rows = sum(int(s.count) for s in shards if s.name in commits)
    if valid_rows is None:
        valid_rows = sum(int(rec.get("valid", int(s.count) - len(rec.get("bad_samples") or [])))
                         for s in shards if (rec := commits.get(s.name)) is not None)
    stamp = now_iso()
    return {
        "format": FORMAT,
        "status": status,
        "generation": generation,
        "created": created or stamp,
        "updated": stamp,
        "config": config,
        "config_hash": config_hash(config),
        "layers": [canonical(dict(layer)) for layer in layers],
        "storage": canonical(dict(storage or {})),
        "shards": entries,
        "rows": {"total": sum(int(s.count) for s in shards), "committed": committed_rows,
                 "valid": int(valid_rows), "invalid": committed_rows - int(valid_rows)},
        "bad_samples": bad,
        "software": dict(software) if software is not None else software_versions(),
    }

