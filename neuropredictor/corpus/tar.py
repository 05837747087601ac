"""Tar shards as WebDataset sees them: member names split into (key, field) by WebDataset's own rules,
and damage (a truncated file, a bad header, data after the end) detected instead of read as a short shard.

Why the project reads tars itself instead of through webdataset's iterators: a shard must never be
silently cut short (webdataset's handlers skip or stop on a bad member), every sample's position must
be known to give it its row, and object stores need seeks instead of a stream per reader. The grouping
rules are webdataset's, so a shard means the same here and to `webdataset.WebDataset`; the test suite
reads our shards with webdataset itself to keep it so.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

from neuropredictor.errors import CorpusError

# WebDataset's own split (webdataset.tariterators.base_plus_ext): the key is the member path up to the
# first "." of its basename, the field is the rest. Members whose basename has no "." are skipped.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# WebDataset skips these members entirely (tar_file_iterator's skip_meta and meta prefix/suffix). We also
# skip macOS AppleDouble members ("._x.jpg", the extended attributes of x.jpg that macOS tar adds): they are
# never stimuli, and each would otherwise be a sample keyed by its folder alone ("a/"), repeated.
_META_RE = re.compile(r"__[^/]*__($|/)|(.*/|)\._[^/]*$")

_TAR_BUFSIZE = 1 << 20  # stream-mode read size: fewer Python-level reads than tarfile's 10 KiB default
# Member names as UTF-8 whatever the locale; bytes that are not UTF-8 survive as surrogates (printable_key)
_NAMES = {"encoding": "utf-8", "errors": "surrogateescape"}
MAX_REASON = 300  # keep per-sample reasons short: they end up in the manifest


def short(text: str, limit: int = MAX_REASON) -> str:
    """text on one line, at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def is_hidden(name: str) -> bool:
    """A file name starting with "." -- the one rule for shard files and image files: hidden files are
    never taken silently (`list_shards` refuses hidden shards, `make_shards` reports hidden images as
    skipped), since they are often not data (macOS '._' forks, partial uploads) and tools disagree on them."""
    return name.startswith(".")


def split_member(name: str) -> tuple[str, str] | None:
    """(key, field) as WebDataset splits a member name, or None for members WebDataset skips (and macOS's
    "._" members)."""
    m = None if _META_RE.match(name) else _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def printable_key(key: str) -> tuple[str, str | None]:
    """(key as it can be stored, None) for a UTF-8 key; for a member name that is not UTF-8 (read with
    surrogateescape), its bytes shown with backslash escapes and the reason the sample is invalid."""
    try:
        key.encode("utf-8")
        return key, None
    except UnicodeEncodeError:
        shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return shown, short(f"the member name '{shown}' is not valid UTF-8: rename it in the shard "
                            "(`neuropredictor shards make` writes UTF-8 names)")


def open_tar(f: Any) -> tarfile.TarFile:
    """A tar reader over an open file. Seekable files (local, s3, most fsspec files) are read in
    random-access mode, so members we don't need are skipped by seeking; streams in stream mode."""
    seekable = bool(getattr(f, "seekable", lambda: False)())
    if seekable:
        return tarfile.open(fileobj=f, mode="r:", tarinfo=_CheckedTarInfo, **_NAMES)
    return tarfile.open(fileobj=f, mode="r|", tarinfo=_CheckedTarInfo, bufsize=_TAR_BUFSIZE, **_NAMES)


def _check_end(tf: tarfile.TarFile, url: str) -> None:
    """Raise unless the archive ended at a zero block followed only by zero padding."""
    end = getattr(tf, "_np_end", None)
    if not isinstance(end, tarfile.EOFHeaderError):
        reason = "no end-of-archive marker (truncated)" if end is None or isinstance(
            end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)) else f"invalid tar header ({end})"
        raise CorpusError(f"shard {url} is truncated or corrupt near byte {tf.offset}: {reason}. "
                          "Re-create or re-upload the shard.")
    # A zero block mid-archive (e.g. a zero-filled hole left by a crash) also reads as the end: the rest
    # of a healthy tar is padding only. Bounded by the file size; a healthy tail is at most one record.
    while chunk := tf.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise CorpusError(f"shard {url} is corrupt: data follows an end-of-archive block near byte "
                              f"{tf.offset}. Re-create or re-upload the shard.")


def members(tf: tarfile.TarFile, url: str, check_end: bool = True) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, key, field) for every member WebDataset would use, and links (which it skips: their samples
    are kept here, as invalid rows that say why), then verify the archive's end (unless the file is only a
    range of samples from inside a shard)."""
    while (ti := tf.next()) is not None:
        tf.members.clear()  # tarfile keeps every TarInfo otherwise: memory would grow with the shard
        if (ti.isreg() or ti.islnk() or ti.issym()) and (split := split_member(ti.name)) is not None:
            yield ti, *split
    if check_end:
        _check_end(tf, url)


def tar_error(url: str, exc: tarfile.TarError) -> str:
    return (f"shard {url} is not a readable tar file, or is truncated or corrupt ({short(str(exc))}): "
            "re-create or re-upload it.")
