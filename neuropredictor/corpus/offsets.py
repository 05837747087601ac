"""Where each sample of a shard lies in the tar: a small sidecar file beside the shard.

    shard-000000.tar            the samples
    shard-000000.offsets.json   {"format", "size", "starts": [count + 1 byte offsets], "keys": [count keys]}

Sample i is the bytes [starts[i], starts[i + 1]) of the tar (its members' headers and data); starts[count]
is where the archive's end marker begins. With it, each DataLoader worker fetches exactly its own batches'
bytes with one ranged read per batch, so a shard on object storage is read once per extraction whatever
the number of workers (without it, every worker would walk the whole tar to find its samples).

`shards make` writes the sidecar with each shard, and `shards index` writes it for shards made by other
tools. A sidecar is only a hint: one that does not match its shard (another size or count) is ignored, and
the keys of every range read are checked against it, so a shard changed behind it is never misread.
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor.corpus.access import access_error
from neuropredictor.corpus.tar import members, open_tar, tar_error
from neuropredictor.errors import CorpusError

OFFSETS_SUFFIX = ".offsets.json"
OFFSETS_FORMAT = "neuropredictor-offsets/1"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Offsets:
    """Byte ranges of a shard's samples (see the module's docstring)."""

    size: int  # the tar's size in bytes
    starts: tuple[int, ...]  # count + 1 offsets, increasing
    keys: tuple[str, ...]  # the samples' keys, as read from the member names

    @property
    def count(self) -> int:
        return len(self.keys)

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Bytes [start, end) of samples first..last-1; the range that ends the shard runs to the end of
        the file, so that its reader also checks the end-of-archive marker."""
        return self.starts[first], (self.size if last == self.count else self.starts[last])


def offsets_path(tar_path: str) -> str:
    """The sidecar's path for a shard's path (or URL)."""
    return tar_path.removesuffix(".tar") + OFFSETS_SUFFIX


def scan_offsets(fs: Any, path: str, url: str) -> Offsets:
    """The offsets and keys of a shard, from its tar headers (no image is decoded; a remote shard is read
    whole, since headers and data interleave). Raises CorpusError for a damaged tar."""
    try:
        with fs.open(path, "rb") as f, open_tar(f) as tf:
            starts: list[int] = []
            keys: list[str] = []
            for ti, key, _field in members(tf, url):
                if not keys or key != keys[-1]:
                    starts.append(ti.offset)
                    keys.append(key)
            starts.append(tf.offset)  # where the end marker begins
            size = f.tell()  # members() read to the end of the file, checking the padding after the marker
        return Offsets(size=size, starts=tuple(starts), keys=tuple(keys))
    except CorpusError:
        raise
    except tarfile.TarError as exc:
        raise CorpusError(tar_error(url, exc)) from exc
    except Exception as exc:
        raise access_error(url, exc, "shard") from exc


def usable(offsets: Offsets) -> str | None:
    """Why a scanned shard cannot have a sidecar (keys that are not UTF-8, or repeated), or None: the
    sidecar's keys check every range read, so they must name one sample each."""
    try:
        "".join(offsets.keys).encode("utf-8")
    except UnicodeEncodeError:
        return "member names that are not UTF-8"
    if len(set(offsets.keys)) != len(offsets.keys):
        return "a key used by two samples"
    return None


def write_offsets(fs: Any, tar_path: str, offsets: Offsets) -> None:
    """The shard's sidecar, written whole (never seen half-written)."""
    body = {"format": OFFSETS_FORMAT, "size": offsets.size, "starts": list(offsets.starts), "keys": list(offsets.keys)}
    fsx.write_bytes_atomic(fs, offsets_path(tar_path),
                           (json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))


def read_offsets(fs: Any, tar_path: str, size: int | None, count: int) -> Offsets | None:
    """The shard's sidecar if there is one and it matches the shard (its size when known, its count);
    else None, and the shard is read whole."""
    path = offsets_path(tar_path)
    try:
        data = json.loads(fsx.cat_small(fs, path))  # one request per shard read, found or not
        if data.get("format") != OFFSETS_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {OFFSETS_FORMAT!r}")
        offsets = Offsets(size=int(data["size"]), starts=tuple(int(s) for s in data["starts"]),
                          keys=tuple(str(k) for k in data["keys"]))
        if len(offsets.starts) != offsets.count + 1 or any(b <= a for a, b in zip(offsets.starts, offsets.starts[1:])) \
                or offsets.starts[-1] > offsets.size:
            raise ValueError("its offsets are inconsistent")
        if (problem := usable(offsets)) is not None:
            raise ValueError(f"it has {problem}")
    except FileNotFoundError:
        return None
    except Exception as exc:  # unreadable, not JSON, or inconsistent: reading the shard whole is always right
        log.warning("ignoring %s (%s); reading the shard whole", fsx.full_url(fs, path), exc)
        return None
    if offsets.count != count or (size is not None and offsets.size != size):
        log.info("%s describes another version of the shard (size or count differ); reading the shard whole",
                 fsx.full_url(fs, path))
        return None
    return offsets
