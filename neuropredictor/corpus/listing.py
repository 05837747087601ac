"""Resolving a corpus to its shards, in order, with sample counts and global row offsets.

    list_shards("shards/")                                  # a folder of .tar shards
    list_shards("s3://bucket/train-{000000..000099}.tar")   # a brace pattern, on any fsspec location
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import braceexpand

from neuropredictor import fs as fsx
from neuropredictor.corpus.access import access_error, connect
from neuropredictor.corpus.make import (IMAGE_EXTENSIONS, INDEX_FORMAT, INDEX_NAME, PACKING_NAME, first_few, packing,
                                        write_index)
from neuropredictor.corpus.offsets import Offsets, read_offsets, scan_offsets, usable, write_offsets
from neuropredictor.corpus.tar import is_hidden, printable_key
from neuropredictor.errors import CorpusError
from neuropredictor.redact import redact_text
from neuropredictor.shard import Shard

log = logging.getLogger(__name__)

_LIST_THRESHOLD = 16  # from this many shards named in one folder, one listing beats a request per shard


class _Resolver:
    """Turns corpus items into shard paths, sharing filesystems and folder listings within one call.

    A corpus can name thousands of shards (a brace pattern, or a list the shell expanded): then one
    listing per folder replaces one request per shard. For a few shards, per-file requests are used, so
    that naming one shard in a bucket prefix with a million objects does not list them all.
    """

    def __init__(self, storage_options: dict | None) -> None:
        self.storage_options = storage_options
        self._fss: dict[str, Any] = {}
        self._listings: dict[tuple[int, str], dict[str, str] | None] = {}
        self._named: dict[tuple[int, str], int] = {}  # (fs, folder) -> how many .tar paths name it

    def fs(self, url: str) -> tuple[Any, str]:
        """Filesystem + path; one filesystem per protocol (a fresh one, so no stale cached listings)."""
        proto = url.split("://", 1)[0] if "://" in url else ""
        if "::" in url or proto not in self._fss:  # chained URLs carry their own options: no sharing
            fs, path = connect(url, self.storage_options)
            if "::" not in url:
                self._fss[proto] = fs
            return fs, path
        fs = self._fss[proto]
        return fs, fs._strip_protocol(url)

    def expand(self, item: str) -> tuple[Any, list[str], bool]:
        """(fs, paths, is_pattern): brace-expanded paths of one corpus item."""
        try:
            fs, pattern = self.fs(item)
            paths = list(braceexpand.braceexpand(pattern)) if "{" in pattern else [pattern]
        except CorpusError:
            raise
        except Exception as exc:  # unbalanced braces
            raise CorpusError(f"cannot expand the brace pattern {item!r}: {exc}. Fix the braces.") from exc
        if not paths:
            raise CorpusError(f"the brace pattern {item!r} expands to nothing: fix the pattern.")
        for path in paths:
            if path.endswith(".tar") and "*" not in path:
                key = (id(fs), fsx.parent(path))
                self._named[key] = self._named.get(key, 0) + 1
        return fs, paths, len(paths) > 1 or paths[0] != pattern

    def _listing(self, fs: Any, parent: str) -> dict[str, dict] | None:
        """basename -> info for a folder; {} when it does not exist; None when it cannot be listed."""
        key = (id(fs), parent)
        if key not in self._listings:
            try:
                entries = fs.ls(parent, detail=True)
                self._listings[key] = {fsx.basename(e["name"]): e for e in entries}
            except FileNotFoundError:
                self._listings[key] = {}
            except PermissionError:  # e.g. GetObject allowed but not ListBucket: ask per file instead
                self._listings[key] = None
        return self._listings[key]

    def _info(self, fs: Any, path: str) -> dict | None:
        """fsspec's info of path (type, size, etag or mtime), or None if it is missing."""
        if path.endswith(".tar") and self._named.get((id(fs), fsx.parent(path)), 0) >= _LIST_THRESHOLD:
            listing = self._listing(fs, fsx.parent(path))
            if listing is not None:
                return listing.get(fsx.basename(path))
        try:
            return fs.info(path)
        except FileNotFoundError as exc:
            # fsspec's HTTP filesystem says "not found" whatever failed: only a 404 or 410 is a missing shard (a
            # refused connection, a timeout or a 403 is not, and the fix differs)
            cause = exc.__cause__
            if "http" in fsx.protocols(fs) and cause is not None and getattr(cause, "status", None) not in (404, 410):
                raise cause from None
            return None

    def resolve(self, item: str, fs: Any, paths: list[str], is_pattern: bool
                ) -> list[tuple[Any, str, dict]]:
        """Shards (fs, path, info) of one expanded corpus item: directories, globs or .tar files."""
        out: list[tuple[Any, str, dict]] = []
        missing: list[str] = []
        for path in paths:
            url = redact_text(fsx.full_url(fs, path) if is_pattern else item)  # for messages only
            try:
                if "*" in path:
                    found = fs.glob(path, detail=True)
                    _refuse_unread_tars(url, [p for p, i in found.items() if i.get("type") == "file"])
                    matches = sorted(p for p, i in found.items() if p.endswith(".tar") and i.get("type") == "file")
                    if not matches:
                        raise CorpusError(f"the pattern {url} matches no .tar files: check the pattern.")
                    out.extend((fs, p, found[p]) for p in matches)
                    continue
                info = self._info(fs, path)
                kind = None if info is None else info.get("type", "file")
                if kind is None:
                    if is_pattern:
                        missing.append(url)
                        continue
                    raise FileNotFoundError(path)
                if kind == "directory":
                    files = [e for e in fs.ls(path, detail=True) if e.get("type") == "file"]
                    _refuse_unread_tars(url, [e["name"] for e in files])
                    entries = sorted((e for e in files if e["name"].endswith(".tar")),
                                     key=lambda e: fsx.basename(e["name"]))
                    if not entries:
                        raise CorpusError(
                            f"no .tar shards in {url}, and no images that can be read (extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)}, in the folder or below): point the corpus at a folder "
                            "of images or of WebDataset shards (make them with make_shards / `neuropredictor "
                            "shards make`)."
                        )
                    out.extend((fs, e["name"], e) for e in entries)
                elif path.endswith(".tar"):
                    out.append((fs, path, info))
                else:
                    raise CorpusError(
                        f"{url} is not a .tar shard: pass a directory of shards, a brace pattern "
                        "(dir/shard-{000000..000009}.tar) or .tar URLs (compressed tars are not supported)."
                    )
            except CorpusError:
                raise
            except Exception as exc:
                raise access_error(url, exc) from exc

        if missing:
            shown = first_few(missing)
            raise CorpusError(
                f"{len(missing)} of {len(paths)} shards of the pattern {redact_text(item)} do not exist: "
                f"{redact_text(shown)}. "
                "Fix the pattern's range, or upload the missing shards."
            )
        return out


_TAR_LIKE = re.compile(r"\.(tar(\.(gz|bz2|xz|zst|lz4))?|tgz|tbz2?|txz)$", re.IGNORECASE)


def _refuse_unread_tars(url: str, paths: list[str]) -> None:
    """CorpusError naming files beside the shards that look like shards but would not be read (compressed
    tars, '.TAR'): the corpus would be short of their samples, silently."""
    unread = sorted(fsx.basename(p) for p in paths if _TAR_LIKE.search(p) and not p.endswith(".tar"))
    if unread:
        shown = first_few(unread)
        raise CorpusError(f"{url} holds shards that would not be read: {shown}. Shards are plain '.tar' files: "
                          "decompress compressed ones (compressed tars are not supported), rename '.TAR' to '.tar'.")


def _refuse_hidden(resolved: list[tuple[Any, str, dict]]) -> None:
    hidden = [fsx.full_url(fs, path) for fs, path, _ in resolved if is_hidden(fsx.basename(path))]
    if hidden:
        shown = first_few(hidden)
        raise CorpusError(
            f"{len(hidden)} shard(s) have hidden names (starting with '.'): {shown}. Hidden files are often "
            "not shards (macOS '._' files, partial uploads) and some tools skip them: rename real shards "
            "without the leading '.', or remove the others."
        )


# Shards counted together by one header scan, their keys checked against each other: (url, size, etag) ->
# count, for the last few scans of this process (a sweep's models, a notebook's runs over one corpus).
_COUNTED: deque[dict[tuple[str, int | None, str | None], int]] = deque(maxlen=8)


def forget_counts() -> None:
    """Forget the counts this process's scans read, as a new process starts (benchmarks, tests)."""
    _COUNTED.clear()


def _counted_before(ids: list[tuple[str, int | None, str | None]],
                    known: Callable[[], Iterable[Shard]] | None) -> list[int] | None:
    """The counts of shards (url, size, etag) when all of them were counted together before, unchanged
    since: by one scan of this process, or among the scanned shards of `known()` (a store's plan, made
    from one listing; never counts taken from an index.json, which may have been stale): their keys were
    checked against each other then. None when any of them must be scanned, and then all
    are, so that the check of their keys covers them all."""
    if any(size is None or etag is None for _url, size, etag in ids):
        return None
    for group in _COUNTED:
        if all(i in group for i in ids):
            return [group[i] for i in ids]
    if known is not None:
        planned = {(s.url, s.size, s.etag): s.count for s in known() if s.scanned}
        if all(i in planned for i in ids):
            return [planned[i] for i in ids]
    return None


def _refuse_duplicate_keys(keys_by_shard: dict[str, Sequence[str]]) -> None:
    """CorpusError naming a key that two samples share (within a shard or across shards), among the shards
    whose headers were scanned and the indexed shards beside them. Shards counted from `index.json` alone
    were checked by `shards make` or `shards index`."""
    first: dict[str, str] = {}
    for url, keys in keys_by_shard.items():
        for key in keys:
            if key in first:
                where = f"twice in {url}" if first[key] == url else f"in {first[key]} and in {url}"
                raise CorpusError(
                    f"the sample key {printable_key(key)[0]!r} is used {where}: keys name the rows and must be "
                    "unique within a corpus. Remake the shards (`neuropredictor shards make` gives every image "
                    "its own key), or leave one of the shards out."
                )
            first[key] = url


def source_of(shard: Shard, storage_options: dict | None = None) -> dict:
    """What a shard's file is now: where (its URL, credentials redacted), its size and etag (object stores:
    a hash of the content). On local disk, where the etag is only the mtime, the sha256 of the bytes too,
    so that a copy with new times still counts as the same file."""
    fs, path = connect(shard.url, storage_options, fresh=False)
    try:
        size, etag = fingerprint(fs.info(path))
        out: dict = {"url": redact_text(shard.url), "size": size, "etag": etag}
        if fsx.is_local(fs):
            with fs.open(path, "rb") as f:
                out["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    except Exception as exc:
        raise access_error(shard.url, exc, "shard") from exc
    return out


def changed_since(recorded: dict, shard: Shard, storage_options: dict | None = None) -> bool:
    """Whether the shard's file (as listed now) differs from the one its rows were extracted from."""
    if recorded.get("size") != shard.size:
        return True
    if recorded.get("etag") == shard.etag:
        return False
    if "sha256" in recorded:  # same size, new mtime: compare the bytes
        return source_of(shard, storage_options).get("sha256") != recorded["sha256"]
    return True


def fingerprint(info: dict) -> tuple[int | None, str | None]:
    """(size, etag) of a listed file; where the filesystem has no etag (local disk), its mtime stands in."""
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag is None:
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        etag = None if mtime is None else f"mtime:{mtime.isoformat() if hasattr(mtime, 'isoformat') else mtime}"
    return (int(size) if size is not None else None), (str(etag).strip('"') if etag is not None else None)


def _refuse_packing(fs: Any, folder: str, indexed: bool) -> None:
    """CorpusError when `shards make` is writing the folder, or was killed while it did, before its first index.json:
    some of its shards are missing (and a listing would count the rest as the whole corpus). With an index.json (a
    make finished here, and another is making the same shards again: the same command on two machines) the folder
    is read as its index says."""
    if indexed:
        return
    try:
        record = packing(fs, folder)
    except PermissionError:  # a role that may read objects but not learn that one is missing: cannot tell
        return
    except Exception as exc:
        raise access_error(fsx.full_url(fs, folder), exc) from exc
    if record is None:
        return
    when = record.get("started_at")
    since = time.strftime(" at %Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else ""
    raise CorpusError(f"{fsx.full_url(fs, folder)} is being packed by `neuropredictor shards make` (started{since} "
                      f"on host {record.get('host', '?')}, {record.get('shards', '?')} shards), or that run was "
                      f"killed: its shards are not all there. Wait for it, or run the same `shards make` again to "
                      f"complete the folder (with --overwrite on object stores, whose shards it does not compare; "
                      f"{PACKING_NAME} goes when it is whole).")


def _read_index(fs: Any, parent: str) -> dict[str, int]:
    """name -> count from `index.json` in `parent`; empty when absent or not ours (then we scan)."""
    path = f"{parent}/{INDEX_NAME}" if parent else INDEX_NAME
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return {}
    except Exception as exc:
        raise access_error(fsx.full_url(fs, path), exc, "corpus index") from exc
    try:
        data = json.loads(raw)
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {INDEX_FORMAT!r}")
        counts = {}
        for entry in data["shards"]:
            name, count = entry["name"], entry["count"]
            if not isinstance(name, str) or not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"bad entry {entry!r}")
            counts[name] = count
        return counts
    except Exception as exc:  # an index we can't trust is ignored: counting from headers is always right
        log.warning("ignoring %s (%s); counting samples from the tar headers", fsx.full_url(fs, path), exc)
        return {}


def list_shards(corpus: str | os.PathLike | Sequence[str | os.PathLike], storage_options: dict | None = None,
                known: Callable[[], Iterable[Shard]] | None = None) -> list[Shard]:
    """Resolve a corpus to its shards, in order, with sample counts and global row offsets.

    `corpus`: a directory (its `*.tar`, sorted by name), a brace pattern (`dir/shard-{000000..000009}.tar`),
    a `*` glob, a single `.tar`, or a list of those; local paths, `file://` or any fsspec URL. Counts come
    from `index.json` next to the shards when it lists them, else from scanning tar headers (no decoding;
    a remote shard is read whole) unless every such shard was counted before, unchanged since (same URL,
    size and etag), by one scan of this process or in the plan of `known()` (a store's; called only
    then). S3 endpoint/credentials come from the environment or from `storage_options`.
    """
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not items or any(not os.fspath(item) for item in items):
        raise CorpusError(
            f"the corpus {corpus!r} is empty: pass a directory of shards, a brace pattern or .tar URLs."
        )
    resolver = _Resolver(storage_options)
    resolved: list[tuple[Any, str, dict]] = []
    expanded = [(os.fspath(item), *resolver.expand(os.fspath(item))) for item in items]
    for item, fs, paths, is_pattern in expanded:
        resolved.extend(resolver.resolve(item, fs, paths, is_pattern))

    _refuse_hidden(resolved)

    names: dict[str, str] = {}
    for fs, path, _ in resolved:
        name = fsx.basename(path)[: -len(".tar")]
        url = fsx.full_url(fs, path)
        if name in names:
            raise CorpusError(
                f"two shards are named {name!r}: {names[name]} and {url}. Shard names must be unique within a "
                "corpus (they name the commit records): list each shard once, or rename one."
            )
        names[name] = url

    indexes: dict[tuple[int, str], dict[str, int]] = {}
    counts: list[int | None] = []
    for fs, path, _ in resolved:
        key = (id(fs), fsx.parent(path))
        if key not in indexes:
            indexes[key] = _read_index(fs, fsx.parent(path))
            _refuse_packing(fs, fsx.parent(path), indexed=bool(indexes[key]))
        counts.append(indexes[key].get(fsx.basename(path)[: -len(".tar")]))

    todo = [i for i, c in enumerate(counts) if c is None]
    ids = [(fsx.full_url(fs, path), *fingerprint(info)) for fs, path, info in (resolved[i] for i in todo)]
    if todo and (before := _counted_before(ids, known)) is not None:
        for i, count in zip(todo, before):
            counts[i] = count
    elif todo:
        for i, offsets in zip(todo, _scan([resolved[i] for i in todo], _indexed_beside(resolved, counts, todo))):
            counts[i] = offsets.count
        _COUNTED.append(dict(zip(ids, (counts[i] for i in todo))))
    return _as_shards(resolved, counts, scanned=set(todo))


def _scan(resolved: list[tuple[Any, str, dict]], beside: dict[str, Sequence[str]] | None = None) -> list[Offsets]:
    """The shards' offsets from their tar headers, refusing a key that two samples share, among them and
    with the keys of `beside` (url -> keys). Header scans are I/O-bound (object stores especially): a few
    threads overlap the requests. Every shard is scanned: damaged ones are named together, in one
    CorpusError (a scan of thousands of remote shards is not repeated for each bad one)."""
    with ThreadPoolExecutor(max_workers=min(8, len(resolved))) as pool:
        futures = [pool.submit(scan_offsets, fs, path, fsx.full_url(fs, path)) for fs, path, _ in resolved]
    scanned, damaged = [], []
    for future in futures:
        try:
            scanned.append(future.result())
        except CorpusError as exc:
            damaged.append(str(exc))
    if damaged:
        more = f"\n  ... and {len(damaged) - 5} more" if len(damaged) > 5 else ""
        raise CorpusError(f"{len(damaged)} of {len(resolved)} shards cannot be read; remake them, or leave them out "
                          "of the corpus:\n  " + "\n  ".join(damaged[:5]) + more)
    _refuse_duplicate_keys({**(beside or {}),
                            **{fsx.full_url(fs, path): o.keys for (fs, path, _), o in zip(resolved, scanned)}})
    return scanned


def _indexed_beside(resolved: list[tuple[Any, str, dict]], counts: Sequence[int | None],
                    todo: Sequence[int]) -> dict[str, Sequence[str]]:
    """The keys of the indexed shards in the folders of the shards to scan (url -> keys): a folder whose
    index.json lists only some of its shards (`shards make` of another prefix into it) may repeat keys
    between the two kinds, which neither its index nor the scan alone would see. One sidecar read each,
    overlapped; an indexed shard without its sidecar is left unchecked (and said so), not read whole."""
    todo = set(todo)
    folders = {(id(resolved[i][0]), fsx.parent(resolved[i][1])) for i in todo}
    beside = [(fs, path, info, count) for i, ((fs, path, info), count) in enumerate(zip(resolved, counts))
              if i not in todo and (id(fs), fsx.parent(path)) in folders]
    if not beside:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(beside))) as pool:
        found = list(pool.map(lambda b: read_offsets(b[0], b[1], fingerprint(b[2])[0], b[3]), beside))
    unchecked = [fsx.full_url(fs, path) for (fs, path, _, _), offsets in zip(beside, found) if offsets is None]
    if unchecked:
        log.warning("%d indexed shard(s) beside unindexed ones have no offsets sidecar, so their keys are not "
                    "compared with the others' (e.g. %s): `neuropredictor shards index` the folder", len(unchecked),
                    unchecked[0])
    return {fsx.full_url(fs, path): offsets.keys for (fs, path, _, _), offsets in zip(beside, found) if offsets}


def _as_shards(resolved: list[tuple[Any, str, dict]], counts: Sequence[int | None],
               scanned: Collection[int] = ()) -> list[Shard]:
    """Shards with their global row offsets; `scanned`: the positions whose counts were read from headers."""
    shards, offset = [], 0
    for i, ((fs, path, info), count) in enumerate(zip(resolved, counts)):
        assert count is not None
        size, etag = fingerprint(info)
        shards.append(Shard(url=fsx.full_url(fs, path), name=fsx.basename(path)[: -len(".tar")], count=count,
                            offset=offset, size=size, etag=etag, scanned=i in scanned))
        offset += count
    return shards


def index_shards(folder: str, storage_options: dict | None = None) -> list[Shard]:
    """Describe a folder of shards made by another tool (img2dataset, webdataset's TarWriter) as `shards make`
    describes its own: one scan of each shard writes its offsets sidecar, then the folder's `index.json`.
    Later plans count without reading a tar, and extractions read each shard's bytes once whatever the
    number of DataLoader workers. Keys that are repeated or not UTF-8 are refused, naming the shard."""
    resolver = _Resolver(storage_options)
    fs, root = resolver.fs(folder)
    try:
        is_dir = fs.isdir(root)
        if not is_dir and not fs.exists(root):
            raise FileNotFoundError(root)
    except Exception as exc:
        raise access_error(folder, exc) from exc
    if not is_dir:
        raise CorpusError(f"{folder} is not a folder: pass the folder that holds the .tar shards "
                          "(each folder of a corpus is indexed on its own).")
    _refuse_packing(fs, root, indexed=False)  # the index it would write would bless the shards there as whole
    resolved = resolver.resolve(folder, fs, [root], False)
    _refuse_hidden(resolved)
    scanned = _scan(resolved)
    shards = _as_shards(resolved, [offsets.count for offsets in scanned])
    for shard, offsets in zip(shards, scanned):
        if (problem := usable(offsets)) is not None:
            raise CorpusError(f"shard {shard.url} has {problem}, so it cannot be indexed: remake it "
                              "(`neuropredictor shards make`), or leave it out of the folder.")
    try:
        for (_fs, path, _info), offsets in zip(resolved, scanned):
            write_offsets(fs, path, offsets)
        write_index(fs, root, shards)  # last: a plan trusts its counts
    except Exception as exc:
        raise access_error(folder, exc, "corpus folder") from exc
    return shards
