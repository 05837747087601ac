"""WebDataset corpora: making shards from a folder, listing/counting shards, reading one shard.

Data path: tar shards (local dir, ``s3://``, any fsspec URL) -> :func:`list_shards` (count samples per
shard, assign global row offsets) -> :func:`read_shard` (decode + preprocess in DataLoader workers,
batches in tar order, with keys and per-sample validity).

Plain library: no Prefect. Shards are opened through fsspec ourselves (WebDataset has no s3 reader),
and member grouping follows WebDataset's rules exactly, so a shard means the same thing here and to
``webdataset.WebDataset``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from neuropredictor.errors import CorpusError

__all__ = [
    "IMAGE_EXTENSIONS",
    "INDEX_FORMAT",
    "INDEX_NAME",
    "Batch",
    "Shard",
    "list_shards",
    "make_shards",
    "read_shard",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Accepted image fields: files taken by :func:`make_shards`, members read by :func:`read_shard`."""

INDEX_NAME = "index.json"
INDEX_FORMAT = "neuropredictor-shards/1"

# WebDataset's own split (webdataset.tariterators.base_plus_ext): the key is the member path up to the
# first "." of its basename, the field is the rest. Members whose basename has no "." are skipped.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# WebDataset skips these members entirely (tar_file_iterator's skip_meta and meta prefix/suffix).
_META_RE = re.compile(r"__[^/]*__($|/)")

_TAR_BUFSIZE = 1 << 20  # stream-mode read size: fewer Python-level reads than tarfile's 10 KiB default
_DUMMY_SIZE = (64, 64)
_MAX_REASON = 300  # keep per-sample reasons short: they end up in the manifest


@dataclass(frozen=True)
class Shard:
    """One tar shard of a corpus and where its rows go in the corpus-wide arrays."""

    url: str  # full fsspec URL of the tar (absolute path for local files; s3://bucket/... otherwise)
    name: str  # file name without ".tar"; unique within a corpus; names commit records
    count: int  # samples in the shard
    offset: int  # global row of its first sample (sum of counts of earlier shards)


@dataclass
class Batch:
    """Consecutive samples of one shard, decoded and transformed (or, read with transform=None, encoded)."""

    index: torch.Tensor  # int64 (B,): positions of these samples within the shard (0-based, tar order)
    keys: list[str]  # the samples' __key__
    images: torch.Tensor | None  # (B, C, H, W) output of `transform`; zeros for invalid samples
    valid: torch.Tensor  # bool (B,)
    errors: dict[str, str] = field(default_factory=dict)  # key -> reason, for invalid samples
    data: list[bytes | None] | None = None  # the encoded images, when read with transform=None

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """Pinned copy of the tensors; DataLoader(pin_memory=True) calls this for custom batch types."""
        return Batch(
            index=self.index.pin_memory(),
            keys=self.keys,
            images=self.images.pin_memory() if self.images is not None else None,
            valid=self.valid.pin_memory(),
            errors=self.errors,
            data=self.data,
        )


# --------------------------------------------------------------------------------------------------
# filesystems


def _url_to_fs(url: str, storage_options: dict | None, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem + path for url. `fresh` bypasses the instance cache (and its stale listings)."""
    opts = dict(storage_options or {})
    if fresh:
        opts["skip_instance_cache"] = True
    try:
        return fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as exc:  # unknown protocol, missing optional backend
        raise CorpusError(
            f"cannot open {url!r}: {exc}. Use a local path or an fsspec URL (s3://bucket/prefix, file://...) "
            "and install the package for its protocol."
        ) from exc


def _full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """URL that opens `path` again from any process: absolute path for local files, proto://... otherwise."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def _access_error(url: str, exc: BaseException, what: str = "corpus") -> CorpusError:
    """A CorpusError that names the URL, what went wrong and what to do. Never includes credentials."""
    if isinstance(exc, CorpusError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return CorpusError(
            f"{what} {url} does not exist: check the path, bucket and prefix "
            "(a corpus is a directory of .tar shards, a brace pattern such as dir/shard-{000000..000009}.tar, "
            "or .tar URLs)."
        )
    if isinstance(exc, PermissionError):
        return CorpusError(
            f"access to {what} {url} was denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or storage_options key/secret) and the permissions."
        )
    return CorpusError(
        f"cannot reach {what} {url}: {type(exc).__name__}: {_short(str(exc))}. Check the endpoint "
        "(AWS_ENDPOINT_URL or storage_options endpoint_url), the network and the credentials."
    )


def _short(text: str, limit: int = _MAX_REASON) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# tar scanning (shared by counting and reading)


class _CheckedTarInfo(tarfile.TarInfo):
    """TarInfo that remembers why the archive ended.

    tarfile treats an invalid or missing header after the first member as a normal end of archive,
    which would silently cut a damaged shard short; the reason recorded here lets us tell a real end
    (a zero block) from damage.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_._np_end = exc  # type: ignore[attr-defined]
            raise


def _split_member(name: str) -> tuple[str, str] | None:
    """(key, field) as WebDataset splits a member name, or None for members WebDataset skips."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META_RE.match(name):
        return None
    m = _KEY_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def _open_tar(f: Any) -> tarfile.TarFile:
    # Seekable files (local, s3, most fsspec files) are opened in random-access mode so that members we
    # don't need are skipped by seeking instead of reading; unseekable streams fall back to stream mode.
    seekable = bool(getattr(f, "seekable", lambda: False)())
    if seekable:
        return tarfile.open(fileobj=f, mode="r:", tarinfo=_CheckedTarInfo)
    return tarfile.open(fileobj=f, mode="r|", tarinfo=_CheckedTarInfo, bufsize=_TAR_BUFSIZE)


def _check_end(tf: tarfile.TarFile, url: str) -> None:
    """Raise unless the archive ended at a zero block followed only by zero padding."""
    end = getattr(tf, "_np_end", None)
    if not isinstance(end, tarfile.EOFHeaderError):
        reason = "no end-of-archive marker (truncated)" if end is None or isinstance(
            end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)) else f"invalid tar header ({end})"
        raise CorpusError(
            f"shard {url} is truncated or corrupt near byte {tf.offset}: {reason}. "
            "Re-create or re-upload the shard."
        )
    # A zero block mid-archive (e.g. a zero-filled hole left by a crash) also reads as the end: the rest
    # of a healthy tar is padding only. Bounded by the file size; a healthy tail is at most one record.
    while chunk := tf.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise CorpusError(
                f"shard {url} is corrupt: data follows an end-of-archive block near byte {tf.offset}. "
                "Re-create or re-upload the shard."
            )


def _iter_members(tf: tarfile.TarFile, url: str) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, key, field) for every member WebDataset would use, then verify the archive's end."""
    while True:
        ti = tf.next()
        if ti is None:
            break
        tf.members.clear()  # tarfile keeps every TarInfo otherwise: memory would grow with the shard
        if not ti.isreg():
            continue
        split = _split_member(ti.name)
        if split is None:
            continue
        yield ti, split[0], split[1]
    _check_end(tf, url)


def _tar_error(url: str, exc: tarfile.TarError) -> str:
    return (
        f"shard {url} is not a readable tar file, or is truncated or corrupt ({_short(str(exc))}): "
        "re-create or re-upload it."
    )


def _count_samples(fs: fsspec.AbstractFileSystem, path: str, url: str) -> int:
    """Samples in a shard, from tar headers only (consecutive members with the same key = one sample)."""
    try:
        with fs.open(path, "rb") as f, _open_tar(f) as tf:
            count, last = 0, None
            for _ti, key, _field in _iter_members(tf, url):
                if key != last:
                    count, last = count + 1, key
            return count
    except CorpusError:
        raise
    except tarfile.TarError as exc:
        raise CorpusError(_tar_error(url, exc)) from exc
    except Exception as exc:
        raise _access_error(url, exc, "shard") from exc


# --------------------------------------------------------------------------------------------------
# make_shards


def _image_files(root: Path) -> list[tuple[str, Path, str]]:
    """(relative posix path, path, lowercase ext) of the images under root, in a deterministic order."""
    found = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Symlinked folders are followed, each real folder once: a symlink cycle must not loop forever.
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        # Hidden entries are skipped: macOS "._x.jpg" resource forks and .git internals are not stimuli.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            ext = fname.rsplit(".", 1)[-1].lower() if "." in fname else ""
            if ext in IMAGE_EXTENSIONS:
                p = Path(dirpath) / fname
                found.append((p.relative_to(root).as_posix(), p, ext))
    found.sort(key=lambda t: t[0].split("/"))  # sort by path components, independent of walk order
    return found


def _key_for(rel: str) -> str:
    # WebDataset splits member names at the first "." of the basename, so keys must not contain dots.
    stem = rel.rsplit(".", 1)[0]
    return stem.replace(".", "_")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0  # fixed metadata: two runs over the same folder give byte-identical shards
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _write_tar(fileobj: Any, items: list[tuple[str, Path, str]]) -> None:
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel, path, ext in items:
            key = _key_for(rel)
            try:
                data = path.read_bytes()  # bytes stored unmodified: no decoding, no re-encoding
            except OSError as exc:
                raise CorpusError(f"cannot read the image {path}: {exc}. Fix its permissions or remove it.") from exc
            tf.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
            meta = json.dumps({"path": rel}, ensure_ascii=False).encode("utf-8")
            tf.addfile(_tarinfo(f"{key}.json", len(meta)), io.BytesIO(meta))


def make_shards(
    image_dir: str | Path,
    out: str,
    maxcount: int = 1000,
    prefix: str = "shard",
    storage_options: dict | None = None,
) -> list[Shard]:
    """Pack the images under `image_dir` into WebDataset shards `{prefix}-{i:06d}.tar` in `out`.

    Each sample is the image bytes, unmodified, as `<key>.<ext>` plus `<key>.json` ({"path": relative
    path}); key = relative path without extension, dots replaced by "_". Writes `index.json` with the
    counts last, and removes stale `{prefix}-NNNNNN.tar` shards left in `out` by an earlier, larger run.
    `out` is a local directory or any fsspec URL (s3://bucket/prefix). Returns the shards.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix must be a non-empty name without '/' or '.', got {prefix!r}")
    root = Path(image_dir)
    if not root.is_dir():
        raise CorpusError(f"image folder {root} does not exist or is not a directory: pass a folder of images.")
    files = _image_files(root)
    if not files:
        raise CorpusError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}: check the folder, or the file extensions."
        )
    seen: dict[str, str] = {}
    for rel, _path, _ext in files:
        key = _key_for(rel)
        if key in seen:
            raise CorpusError(
                f"{seen[key]} and {rel} under {root} map to the same sample key {key!r} "
                "(keys drop the extension and replace '.' by '_'): rename one of them."
            )
        seen[key] = rel
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise CorpusError(f"{rel!r} under {root} is not a valid UTF-8 file name: rename it.") from None
        if _split_member(f"{key}.{_ext}") != (key, _ext):
            # e.g. a folder named "__x__": WebDataset would skip the member, so the sample would vanish.
            raise CorpusError(
                f"{rel} under {root} gives the sample key {key!r}, which WebDataset would skip or split "
                "differently: rename the file or its folder."
            )

    fs, root_out = _url_to_fs(str(out), storage_options, fresh=True)
    local = isinstance(fs, LocalFileSystem)
    try:
        fs.makedirs(root_out, exist_ok=True)
        groups = [files[i : i + maxcount] for i in range(0, len(files), maxcount)]
        shards, offset = [], 0
        for i, items in enumerate(groups):
            name = f"{prefix}-{i:06d}"
            path = f"{root_out.rstrip('/')}/{name}.tar"
            if local:
                # Write next to the target and rename: a crash never leaves a half-written .tar behind.
                tmp = f"{path}.tmp-{os.getpid()}"
                try:
                    with open(tmp, "wb") as f:
                        _write_tar(f, items)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                # Remote: build locally, then upload in one go (an object store commits the object only
                # when the upload completes, so readers never see a partial shard).
                with tempfile.NamedTemporaryFile(suffix=".tar") as f:
                    _write_tar(f, items)
                    f.flush()
                    fs.put_file(f.name, path)
            shards.append(Shard(url=_full_url(fs, path), name=name, count=len(items), offset=offset))
            offset += len(items)

        stale_re = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")
        for entry in fs.ls(root_out, detail=False):
            m = stale_re.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m and int(m.group(1)) >= len(shards):
                fs.rm_file(entry)

        index = {
            "format": INDEX_FORMAT,
            "shards": [{"name": s.name, "count": s.count} for s in shards],
            "total": offset,
        }
        fs.pipe_file(f"{root_out.rstrip('/')}/{INDEX_NAME}", (json.dumps(index, indent=1) + "\n").encode())
    except CorpusError:
        raise
    except Exception as exc:
        raise _access_error(str(out), exc, "output") from exc
    return shards


# --------------------------------------------------------------------------------------------------
# list_shards


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


_LIST_THRESHOLD = 16  # from this many shards named in one folder, one listing beats a request per shard


class _Resolver:
    """Turns corpus items into shard paths, sharing filesystems and folder listings within one call.

    A corpus can name thousands of shards (a brace pattern, or a list the shell expanded): then one
    listing per folder replaces one request per shard. For a few shards, per-file requests are used, so
    that naming one shard in a bucket prefix with a million objects does not list them all.
    """

    def __init__(self, storage_options: dict | None) -> None:
        self.storage_options = storage_options
        self._fss: dict[str, fsspec.AbstractFileSystem] = {}
        self._listings: dict[tuple[int, str], dict[str, str] | None] = {}
        self._named: dict[tuple[int, str], int] = {}  # (fs, folder) -> how many .tar paths name it

    def fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """Filesystem + path; one filesystem per protocol (a fresh one, so no stale cached listings)."""
        proto = url.split("://", 1)[0] if "://" in url else ""
        if "::" in url or proto not in self._fss:  # chained URLs carry their own options: no sharing
            fs, path = _url_to_fs(url, self.storage_options, fresh=True)
            if "::" not in url:
                self._fss[proto] = fs
            return fs, path
        fs = self._fss[proto]
        return fs, fs._strip_protocol(url)

    def expand(self, item: str) -> tuple[fsspec.AbstractFileSystem, list[str], bool]:
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
                key = (id(fs), _parent(path))
                self._named[key] = self._named.get(key, 0) + 1
        return fs, paths, len(paths) > 1 or paths[0] != pattern

    def _listing(self, fs: fsspec.AbstractFileSystem, parent: str) -> dict[str, str] | None:
        """basename -> type for a folder; {} when it does not exist; None when it cannot be listed."""
        key = (id(fs), parent)
        if key not in self._listings:
            try:
                entries = fs.ls(parent, detail=True)
                self._listings[key] = {_basename(e["name"]): e.get("type", "file") for e in entries}
            except FileNotFoundError:
                self._listings[key] = {}
            except PermissionError:  # e.g. GetObject allowed but not ListBucket: ask per file instead
                self._listings[key] = None
        return self._listings[key]

    def _kind(self, fs: fsspec.AbstractFileSystem, path: str) -> str | None:
        """"file", "directory" or None (missing)."""
        if path.endswith(".tar") and self._named.get((id(fs), _parent(path)), 0) >= _LIST_THRESHOLD:
            listing = self._listing(fs, _parent(path))
            if listing is not None:
                return listing.get(_basename(path))
        try:
            return fs.info(path).get("type", "file")
        except FileNotFoundError:
            return None

    def resolve(self, item: str, fs: fsspec.AbstractFileSystem, paths: list[str], is_pattern: bool
                ) -> list[tuple[fsspec.AbstractFileSystem, str]]:
        """Shard paths (fs, path) for one expanded corpus item: directories, globs or .tar files."""
        out: list[tuple[fsspec.AbstractFileSystem, str]] = []
        missing: list[str] = []
        for path in paths:
            url = _full_url(fs, path) if is_pattern else item
            try:
                if "*" in path:
                    matches = sorted(p for p in fs.glob(path) if p.endswith(".tar") and fs.isfile(p))
                    if not matches:
                        raise CorpusError(f"the pattern {url} matches no .tar files: check the pattern.")
                    out.extend((fs, p) for p in matches)
                    continue
                kind = self._kind(fs, path)
                if kind is None:
                    if is_pattern:
                        missing.append(url)
                        continue
                    raise FileNotFoundError(path)
                if kind == "directory":
                    entries = sorted(
                        (e["name"] for e in fs.ls(path, detail=True)
                         if e.get("type") == "file" and e["name"].endswith(".tar")),
                        key=_basename,
                    )
                    if not entries:
                        raise CorpusError(
                            f"no .tar shards in {url}: point the corpus at a folder of WebDataset shards "
                            "(make them with make_shards / `neuropredictor shards make`)."
                        )
                    out.extend((fs, e) for e in entries)
                elif path.endswith(".tar"):
                    out.append((fs, path))
                else:
                    raise CorpusError(
                        f"{url} is not a .tar shard: pass a directory of shards, a brace pattern "
                        "(dir/shard-{000000..000009}.tar) or .tar URLs (compressed tars are not supported)."
                    )
            except CorpusError:
                raise
            except Exception as exc:
                raise _access_error(url, exc) from exc

        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CorpusError(
                f"{len(missing)} of {len(paths)} shards of the pattern {item} do not exist: {shown}. "
                "Fix the pattern's range, or upload the missing shards."
            )
        return out


def _read_index(fs: fsspec.AbstractFileSystem, parent: str) -> dict[str, int]:
    """name -> count from `index.json` in `parent`; empty when absent or not ours (then we scan)."""
    path = f"{parent}/{INDEX_NAME}" if parent else INDEX_NAME
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return {}
    except Exception as exc:
        raise _access_error(_full_url(fs, path), exc, "corpus index") from exc
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
        log.warning("ignoring %s (%s); counting samples from the tar headers", _full_url(fs, path), exc)
        return {}


def list_shards(corpus: str | os.PathLike | Sequence[str | os.PathLike], storage_options: dict | None = None) -> list[Shard]:
    """Resolve a corpus to its shards, in order, with sample counts and global row offsets.

    `corpus`: a directory (its `*.tar`, sorted by name), a brace pattern (`dir/shard-{000000..000009}.tar`),
    a `*` glob, a single `.tar`, or a list of those; local paths, `file://` or any fsspec URL. Counts come
    from `index.json` next to the shards when it lists them, else from scanning tar headers (no decoding).
    S3 endpoint/credentials come from the environment or from `storage_options`.
    """
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not items or any(not os.fspath(item) for item in items):
        raise CorpusError(
            f"the corpus {corpus!r} is empty: pass a directory of shards, a brace pattern or .tar URLs."
        )
    resolver = _Resolver(storage_options)
    resolved: list[tuple[fsspec.AbstractFileSystem, str]] = []
    expanded = [(os.fspath(item), *resolver.expand(os.fspath(item))) for item in items]
    for item, fs, paths, is_pattern in expanded:
        resolved.extend(resolver.resolve(item, fs, paths, is_pattern))

    names: dict[str, str] = {}
    for fs, path in resolved:
        name = _basename(path)[: -len(".tar")]
        url = _full_url(fs, path)
        if name in names:
            raise CorpusError(
                f"two shards are named {name!r}: {names[name]} and {url}. Shard names must be unique within a "
                "corpus (they name the commit records): list each shard once, or rename one."
            )
        names[name] = url

    indexes: dict[tuple[int, str], dict[str, int]] = {}
    counts: list[int | None] = []
    for fs, path in resolved:
        key = (id(fs), _parent(path))
        if key not in indexes:
            indexes[key] = _read_index(fs, _parent(path))
        counts.append(indexes[key].get(_basename(path)[: -len(".tar")]))

    todo = [i for i, c in enumerate(counts) if c is None]
    if todo:
        # Header scans are I/O-bound (object stores especially): a few threads overlap the requests.
        def scan(i: int) -> int:
            fs, path = resolved[i]
            return _count_samples(fs, path, _full_url(fs, path))

        with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
            for i, n in zip(todo, pool.map(scan, todo)):
                counts[i] = n

    shards, offset = [], 0
    for (fs, path), count in zip(resolved, counts):
        assert count is not None
        shards.append(Shard(url=_full_url(fs, path), name=_basename(path)[: -len(".tar")], count=count, offset=offset))
        offset += count
    return shards


# --------------------------------------------------------------------------------------------------
# read_shard


@dataclass
class _Failure:
    """Sent from a worker instead of a batch: the main process raises it as a clean CorpusError."""

    message: str


def _identity(x: Any) -> Any:
    return x


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # full decode now, so truncated files fail here (LOAD_TRUNCATED_IMAGES left False)
        return img.convert("RGB")


def transform_problem(out: Any, shape: tuple[int, ...]) -> str | None:
    """Why a transform's output cannot be a row of the batch (None when it can)."""
    if isinstance(out, torch.Tensor) and tuple(out.shape) == shape:
        return None
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    return _short(f"transform gave {got}, expected a tensor of shape {shape}")


class _ShardBatches(IterableDataset):
    """Batches of one shard; with several DataLoader workers, worker w builds batches w, w+n, w+2n, ...

    Every worker streams the whole tar (reading the data only of its own samples), so each knows every
    sample's position; the DataLoader takes one batch from each worker in turn, which is global order.
    """

    def __init__(
        self,
        shard: Shard,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        batch_size: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        storage_options: dict | None,
    ) -> None:
        self.shard = shard
        self.transform = transform
        self.batch_size = batch_size
        self.shape = shape
        self.dtype = dtype
        self.storage_options = storage_options

    def _build(self, samples: list[tuple[int, str, bytes | None, list[str]]]) -> Batch:
        n = len(samples)
        encoded_only = self.transform is None  # decoding happens later, on the device
        images = None if encoded_only else torch.zeros((n, *self.shape), dtype=self.dtype)
        valid = torch.zeros(n, dtype=torch.bool)
        errors: dict[str, str] = {}
        for j, (_i, key, data, fields) in enumerate(samples):
            if data is None:
                errors[key] = _short(
                    f"no image member ({', '.join(IMAGE_EXTENSIONS)}) in the sample; it has: {', '.join(fields) or 'nothing'}"
                )
                continue
            if not data:
                errors[key] = "cannot decode image: empty image member (0 bytes)"
                continue
            if encoded_only:
                valid[j] = True
                continue
            try:
                img = _decode(data)
            except Exception as exc:
                errors[key] = _short(f"cannot decode image: {type(exc).__name__}: {exc}")
                continue
            try:
                out = self.transform(img)
            except Exception as exc:
                errors[key] = _short(f"transform failed: {type(exc).__name__}: {exc}")
                continue
            problem = transform_problem(out, self.shape)
            if problem:
                errors[key] = problem
                continue
            images[j] = out
            valid[j] = True
        return Batch(
            index=torch.tensor([s[0] for s in samples], dtype=torch.int64),
            keys=[s[1] for s in samples],
            images=images,
            valid=valid,
            errors=errors,
            data=[s[2] for s in samples] if encoded_only else None,
        )

    def __iter__(self) -> Iterator[Batch | _Failure]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self._batches(wid, nworkers)
        except CorpusError as exc:
            yield _Failure(str(exc))
        except tarfile.TarError as exc:
            yield _Failure(_tar_error(self.shard.url, exc))
        except Exception as exc:
            yield _Failure(str(_access_error(self.shard.url, exc, "shard")))

    def _batches(self, wid: int, nworkers: int) -> Iterator[Batch]:
        shard, bs = self.shard, self.batch_size
        # A fresh filesystem per worker: fsspec's async filesystems (s3fs) are not fork-safe.
        fs, path = _url_to_fs(shard.url, self.storage_options, fresh=True)
        with fs.open(path, "rb") as f, _open_tar(f) as tf:
            pending: list[tuple[int, str, bytes | None, list[str]]] = []
            cur: list[Any] | None = None  # [index, key, image bytes or None, fields]
            n = 0  # samples seen so far

            def finish(sample: list[Any]) -> Iterator[Batch]:
                i = sample[0]
                if (i // bs) % nworkers == wid:
                    pending.append(tuple(sample))  # type: ignore[arg-type]
                    if len(pending) == bs:
                        yield self._build(pending)
                        pending.clear()

            for ti, key, fld in _iter_members(tf, shard.url):
                if cur is None or key != cur[1]:
                    if cur is not None:
                        yield from finish(cur)
                    if n >= shard.count:
                        # Stop before anything past the shard's rows exists: they belong to the next shard.
                        raise CorpusError(
                            f"shard {shard.url} has more than {shard.count} samples (the corpus index says "
                            f"{shard.count}): the index or the listing is stale; list the corpus again."
                        )
                    cur = [n, key, None, []]
                    n += 1
                cur[3].append(fld)
                owned = (cur[0] // bs) % nworkers == wid
                if owned and cur[2] is None and fld in IMAGE_EXTENSIONS:
                    fobj = tf.extractfile(ti)
                    cur[2] = fobj.read() if fobj is not None else b""
            if n != shard.count:
                raise CorpusError(
                    f"shard {shard.url} has {n} samples but the corpus index says {shard.count}: the index or "
                    "the listing is stale, or the shard was replaced; list the corpus again."
                )
            if cur is not None:
                yield from finish(cur)
            if pending:
                yield self._build(pending)


def _forget_parent_thread_exits(_worker_id: int) -> None:
    """A forked worker inherits the parent's thread-exit hooks, e.g. those of Prefect's log and event
    services once a flow has run in this process. They assume threads the fork does not have and fail
    at the worker's exit (exit code 1, the batches lost): the worker is not the parent, so drop them."""
    import threading

    getattr(threading, "_threading_atexits", []).clear()


def read_shard(
    shard: Shard,
    transform: Callable[[Image.Image], torch.Tensor] | None,
    batch_size: int,
    num_workers: int = 0,
    storage_options: dict | None = None,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Yield the shard's samples in tar order as Batches of `batch_size` (the last may be smaller).

    Decoding (PIL, RGB) and `transform` run in `num_workers` DataLoader worker processes (in this
    process when 0); `transform` must be picklable and give a fixed-shape tensor. A sample that cannot
    be decoded or transformed is kept with valid=False, a zero image and a reason in `errors`. An
    unreadable shard, or one whose sample count differs from `shard.count`, raises CorpusError.

    With `transform=None` nothing is decoded: batches carry the encoded images in `data` (images None),
    for :class:`neuropredictor.device_decode.DeviceDecoder`; samples without an image are invalid already.
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

    n_batches = -(-shard.count // batch_size)
    # Workers beyond the number of batches would only re-read the tar: don't start them.
    workers = min(num_workers, n_batches)
    dataset = _ShardBatches(shard, transform, batch_size, tuple(ref.shape), ref.dtype, storage_options)
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        worker_init_fn=_forget_parent_thread_exits,
    )
    expected = 0
    for item in loader:
        if isinstance(item, _Failure):
            raise CorpusError(item.message)
        # Order is what the caller's row arithmetic relies on: check it rather than assume it.
        if len(item) == 0 or int(item.index[0]) != expected:
            raise RuntimeError(
                f"internal error: batch starting at {int(item.index[0]) if len(item) else None} "
                f"arrived where {expected} was expected (shard {shard.url})"
            )
        expected += len(item)
        yield item
