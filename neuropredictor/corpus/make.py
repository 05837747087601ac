"""Making shards from a folder of images: stable keys (relative paths), unmodified image bytes, an index.

    make_shards("stimuli/", "shards/", maxcount=1000)   # shards/shard-000000.tar ..., shards/index.json
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor.corpus.access import access_error, connect
from neuropredictor.corpus.offsets import OFFSETS_SUFFIX, Offsets, write_offsets
from neuropredictor.corpus.tar import is_hidden, split_member
from neuropredictor.errors import CorpusError
from neuropredictor.shard import Shard

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif")
"""Accepted image fields: files taken by :func:`make_shards`, members read by the corpus readers (a GIF's
or multi-page TIFF's first frame)."""

SkipFn = Callable[[str, str], None]
"""on_skip(relative path, reason) for each file or folder `make_shards` leaves out."""

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "neuropredictor-shards/1"
PACKING_NAME = "_packing.json"  # in a folder while `shards make` writes it: its shards are not all there yet


def packing(fs: Any, folder: str) -> dict | None:
    """The record of the last `shards make` that started writing into folder and has not finished (or was killed),
    or None."""
    record, damaged = fsx.read_json(fs, f"{folder.rstrip('/')}/{PACKING_NAME}")
    return record if record is not None else ({} if damaged else None)


def _unmark(fs: Any, marker: str, token: str) -> None:
    """Remove the packing marker if it is still this run's: a make that started after this one (the same command on
    another machine) wrote its own, which it removes when it is done."""
    record, _damaged = fsx.read_json(fs, marker)
    if record is not None and record.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(marker)


def _packed_folders(root: Path) -> dict[str, str]:
    """Real path -> relative path of the folders of the tree that are packed (not hidden; links not followed)."""
    out = {}
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        out[os.path.realpath(dirpath)] = Path(dirpath).relative_to(root).as_posix()
    return out


def _walk_images(root: Path, skipped: list[tuple[str, str]]) -> Iterator[tuple[str, Path, str]]:
    """(relative posix path, path, lowercase ext) of the images under root, in walk order; everything
    else is appended to `skipped` as (relative path, reason)."""
    # the tree's own folders, listed at the first symlinked folder: a symlink to one of them is left out (its
    # images keep their real paths as keys); symlinks to folders outside are followed
    own: dict[str, str] = {}
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root)
        # Symlinked folders are followed, each real folder once: a symlink cycle must not loop forever.
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            skipped.append((rel_dir.as_posix() + "/", "a folder already packed (symlink)"))
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        # Hidden entries are left out (macOS "._x.jpg" resource forks and .git internals are not stimuli),
        # and said so.
        skipped += [((rel_dir / d).as_posix() + "/", "hidden folder") for d in dirnames if is_hidden(d)]
        linked = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        if linked and not own:
            own.update(_packed_folders(root))
        links = {d: own[t] for d in linked if (t := os.path.realpath(os.path.join(dirpath, d))) in own}
        skipped += [((rel_dir / d).as_posix() + "/", f"a symlink to {target}/, packed there") for d, target in
                    links.items() if not is_hidden(d)]
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d) and d not in links)
        for fname in sorted(filenames):
            rel = (rel_dir / fname).as_posix()
            ext = fname.rsplit(".", 1)[-1].lower() if "." in fname else ""
            if is_hidden(fname):
                skipped.append((rel, "hidden file"))
            elif ext in IMAGE_EXTENSIONS:
                yield rel, Path(dirpath) / fname, ext
            else:
                skipped.append((rel, f"not an image extension ({', '.join(IMAGE_EXTENSIONS)})"))


def image_files(root: Path, on_skip: SkipFn | None = None) -> list[tuple[str, Path, str]]:
    """(relative posix path, path, lowercase ext) of the images under root, in a deterministic order;
    everything else is reported to on_skip, when given."""
    skipped: list[tuple[str, str]] = []
    found = sorted(_walk_images(root, skipped), key=lambda t: t[0].split("/"))  # by path components
    if on_skip is not None:
        for rel, reason in sorted(skipped):
            on_skip(rel, reason)
    return found


def has_images(root: Path) -> bool:
    """Whether there is an image under root, by the rules of `image_files`; stops at the first one."""
    return next(_walk_images(root, []), None) is not None


def unreadable_image(path: Path, exc: OSError) -> CorpusError:
    """The error for an image file of a folder that cannot be read; a broken link says where it points."""
    if path.is_symlink() and not path.exists():
        return CorpusError(f"cannot read the image {path}: it is a symbolic link to {os.readlink(path)}, which does "
                           "not exist. Fix the link or remove it.")
    return CorpusError(f"cannot read the image {path}: {exc}. Fix its permissions or remove it.")


def key_for(rel: str) -> str:
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


def _write_tar(fileobj: Any, items: list[tuple[str, Path, str]]) -> Offsets:
    """The shard's tar, and where each of its samples lies (its sidecar, without reading the tar back)."""
    starts, keys = [], []
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel, path, ext in items:
            key = key_for(rel)
            starts.append(tf.offset)  # where the sample's first header (pax, if any) begins
            keys.append(key)
            try:
                data = path.read_bytes()  # bytes stored unmodified: no decoding, no re-encoding
            except OSError as exc:
                raise unreadable_image(path, exc) from exc
            tf.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
            meta = json.dumps({"path": rel}, ensure_ascii=False).encode("utf-8")
            tf.addfile(_tarinfo(f"{key}.json", len(meta)), io.BytesIO(meta))
        starts.append(tf.offset)  # the end-of-archive marker
    return Offsets(size=fileobj.tell(), starts=tuple(starts), keys=tuple(keys))


def _entries(fs: Any, folder: str) -> list[str]:
    try:
        return fs.ls(folder, detail=False)
    except FileNotFoundError:  # an object-store prefix exists only once something is under it
        return []


def _refuse_replacing(fs: Any, path: str, exists: bool, overwrite: bool, compared: bool) -> None:
    if exists and not overwrite:
        what = "holds other images than this run would pack there" if compared else \
            "already exists (shards on object stores are not compared with what this run would write)"
        raise CorpusError(f"{fsx.full_url(fs, path)} {what}: pass overwrite=True to replace the shards, or "
                          "another output folder")


def first_few(names: list[str], n: int = 5) -> str:
    """The first n names, and how many more there are."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def write_index(fs: Any, folder: str, shards: list[Shard]) -> None:
    """`index.json` in folder: each shard's sample count, so that plans count without reading a tar."""
    index = {"format": INDEX_FORMAT, "shards": [{"name": s.name, "count": s.count} for s in shards],
             "total": sum(s.count for s in shards)}
    fsx.write_bytes_atomic(fs, f"{folder.rstrip('/')}/{INDEX_NAME}", (json.dumps(index, indent=1) + "\n").encode())


def _same_bytes(a: str, b: str) -> bool:
    if not os.path.exists(b) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def make_shards(
    image_dir: str | Path,
    out: str,
    maxcount: int = 1000,
    prefix: str = "shard",
    storage_options: dict | None = None,
    on_skip: SkipFn | None = None,
    overwrite: bool = False,
) -> list[Shard]:
    """Pack the images under `image_dir` into WebDataset shards `{prefix}-{i:06d}.tar` in `out`.

    Each sample is the image bytes, unmodified, as `<key>.<ext>` plus `<key>.json` ({"path": relative
    path}); key = relative path without extension, dots replaced by "_". Beside each shard goes its
    offsets sidecar (`corpus.offsets`); `index.json` with the counts is written last.
    `out` is a local directory or any fsspec URL (s3://bucket/prefix). Returns the shards.

    Shards already in `out` are another corpus (stores may be planned on them): only with `overwrite` are
    they replaced, and those past this run's last one removed. Without it, making the same shards again is
    allowed (a byte-identical local shard is left as it is), and anything else is refused before it is
    touched. While it writes, `out` holds `_packing.json`: a folder where it was killed before its index.json
    was written is refused by corpus listings (its shards are not all there), until a make completes it.

    Files that are not images (by extension) and hidden files are left out, each reported to
    `on_skip(relative path, reason)` (by default: logged as one warning). Two files that would share a
    sample key are refused.
    """
    if maxcount < 1:
        raise CorpusError(f"maxcount must be at least 1 (images per shard), got {maxcount}")
    if not prefix or "/" in prefix or "." in prefix:
        raise CorpusError(f"prefix must be a non-empty name without '/' or '.' (shards are PREFIX-000000.tar), "
                          f"got {prefix!r}")
    root = Path(image_dir)
    if not root.is_dir():
        raise CorpusError(f"image folder {root} does not exist or is not a directory: pass a folder of images.")
    skipped: list[tuple[str, str]] = []
    files = image_files(root, on_skip or (lambda rel, reason: skipped.append((rel, reason))))
    if skipped:
        log.warning("left out %d file(s) under %s that are not images: %s", len(skipped), root,
                    "; ".join(f"{rel} ({reason})" for rel, reason in skipped[:10])
                    + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""))
    if not files:
        raise CorpusError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}: check the folder, or the file extensions."
        )
    seen: dict[str, str] = {}
    for rel, _path, _ext in files:
        key = key_for(rel)
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
        if split_member(f"{key}.{_ext}") != (key, _ext):
            # e.g. a folder named "__x__": WebDataset would skip the member, so the sample would vanish.
            raise CorpusError(
                f"{rel} under {root} gives the sample key {key!r}, which WebDataset would skip or split "
                "differently: rename the file or its folder."
            )

    fs, root_out = connect(str(out), storage_options)
    local = fsx.is_local(fs)
    if local and Path(root_out).resolve() == root.resolve():  # its tars among its images: no longer a corpus
        raise CorpusError(f"the shards would be written into the image folder {root} itself: pass another "
                          "output folder")
    groups = [files[i : i + maxcount] for i in range(0, len(files), maxcount)]
    marker, token = f"{root_out.rstrip('/')}/{PACKING_NAME}", uuid.uuid4().hex
    replaced = False
    try:
        fs.makedirs(root_out, exist_ok=True)
        shard_re = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})(\.tar|{re.escape(OFFSETS_SUFFIX)})$")
        existing = {entry: shard_re.match(fsx.basename(entry)) for entry in _entries(fs, root_out)}
        names = {fsx.basename(e) for e in existing}
        stale = sorted(e for e, m in existing.items() if m and int(m.group(1)) >= len(groups))
        if stale and not overwrite:
            names = first_few([fsx.basename(e) for e in stale], 3)
            raise CorpusError(f"{fsx.full_url(fs, root_out)} holds shards of another corpus ({names}) that this one "
                              f"({len(groups)} shards) would delete: pass overwrite=True to replace "
                              "them, or another output folder")
        fsx.write_bytes_atomic(fs, marker, json.dumps(
            {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
             "shards": len(groups)}).encode())
        shards, offset = [], 0
        for i, items in enumerate(groups):
            name = f"{prefix}-{i:06d}"
            path = f"{root_out.rstrip('/')}/{name}.tar"
            if local:
                # Write next to the target and rename: a crash never leaves a half-written .tar behind.
                tmp = f"{path}.tmp-{os.getpid()}"
                try:
                    with open(tmp, "wb") as f:
                        offsets = _write_tar(f, items)
                    # An identical shard is left as it is: stores planned on it see the same file (its
                    # mtime is part of its fingerprint) and resume.
                    if not _same_bytes(tmp, path):
                        _refuse_replacing(fs, path, f"{name}.tar" in names, overwrite, compared=True)
                        os.replace(tmp, path)
                        replaced = True
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                # the listing above says whether it exists (no request per shard); comparing would download it
                _refuse_replacing(fs, path, f"{name}.tar" in names, overwrite, compared=False)
                # Remote: build locally, then upload in one go (an object store commits the object only
                # when the upload completes, so readers never see a partial shard).
                with tempfile.NamedTemporaryFile(suffix=".tar") as f:
                    offsets = _write_tar(f, items)
                    f.flush()
                    fs.put_file(f.name, path, **fsx.in_parts(fs))
                    replaced = True
            write_offsets(fs, path, offsets)
            shards.append(Shard(url=fsx.full_url(fs, path), name=name, count=len(items), offset=offset))
            offset += len(items)

        for entry in stale:
            fs.rm_file(entry)
        others = sorted(fsx.basename(e) for e, m in existing.items() if not m and e.endswith(".tar"))
        if others:
            log.warning("%s also holds %d shard(s) this run did not make (%s): a folder of shards is one corpus, "
                        "so extractions read them too (index.json lists only this run's)", out, len(others),
                        first_few(others, 3))
        write_index(fs, root_out, shards)
        _unmark(fs, marker, token)
    except Exception as exc:
        if not replaced:  # refused, or failed, before it changed a shard: the folder is as it was
            with contextlib.suppress(Exception):
                _unmark(fs, marker, token)
        if isinstance(exc, CorpusError):
            raise
        raise access_error(str(out), exc, "output") from exc
    return shards
