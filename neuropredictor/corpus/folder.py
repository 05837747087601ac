"""A folder of images as a corpus: its shards are made once, beside the output store, and remade only when
the folder changes.

    shards_for("stimuli/", out="runs/feats.zarr")  # -> "runs/stimuli-1a2b3c4d.shards" (made or reused)

The shards are exactly what `make_shards` (and `neuropredictor shards make`) gives: keys are the images'
relative paths without extension, rows follow the sorted paths. A listing of the folder (relative path,
size, modification time of every image) is kept with the shards; a run whose listing differs remakes them,
and make_shards leaves byte-identical shards untouched, so a store extracted from an unchanged part of the
folder still resumes, while changed shards are refused by the store's fingerprint check (never mixed in).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from neuropredictor import fs as fsx
from neuropredictor.corpus.make import has_images, image_files, key_for, make_shards, unreadable_image
from neuropredictor.errors import CorpusError

log = logging.getLogger(__name__)

LISTING_NAME = "folder.json"
SHARD_SIZE = 1000  # images per shard made from a folder: enough shards to resume by, few enough to list


def is_image_folder(corpus: object) -> bool:
    """Whether corpus names a local folder of images rather than of shards: it holds images somewhere
    under it and no .tar directly. A folder with both is refused: either reading drops part of it."""
    if not isinstance(corpus, (str, os.PathLike)) or "://" in os.fspath(corpus):
        return False
    root = Path(corpus)
    if not root.is_dir() or not has_images(root):
        return False
    with os.scandir(root) as entries:
        tars = sorted(e.name for e in entries if e.name.endswith(".tar"))
    if tars:
        raise CorpusError(
            f"the corpus {os.fspath(corpus)!r} holds both .tar files ({', '.join(tars[:3])}"
            f"{' ...' if len(tars) > 3 else ''}) and images: read as shards its images would be left out, read "
            "as images its .tar files would. Move the .tar files out of the folder of images, or the images "
            "out of the folder of shards.")
    return True


def shard_folder(image_dir: str | os.PathLike, out: str) -> str:
    """Where the shards of image_dir go for the store at out: a sibling of the store named after the image
    folder and a hash of its absolute path (two folders of the same name never share shards)."""
    source = Path(image_dir).resolve()
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return f"{fsx.parent(str(out).rstrip('/')) or '.'}/{source.name}-{digest}.shards"


def folder_keys(image_dir: str | os.PathLike) -> list[str]:
    """The keys the images of a folder get (their relative paths without extension), without packing it."""
    return [key_for(rel) for rel, _path, _ext in image_files(Path(image_dir))]


def _listing(image_dir: Path) -> dict:
    stats = []
    for rel, path, _ext in image_files(image_dir):
        try:
            stats.append((rel, path.stat()))
        except OSError as exc:  # a broken symlink, most often
            raise unreadable_image(path, exc) from exc
    return {"source": str(image_dir.resolve()), "shard_size": SHARD_SIZE,
            "images": [[rel, st.st_size, st.st_mtime_ns] for rel, st in stats]}


def shards_for(image_dir: str | os.PathLike, out: str, storage_options: dict | None = None) -> str:
    """The shard folder of image_dir for the store at out, made now if missing or if the folder changed."""
    target = shard_folder(image_dir, out)
    listing = _listing(Path(image_dir))
    fs, path = fsx.connect(target, storage_options, error=CorpusError, what="shard folder")
    # a damaged listing reads as none: the shards are made again (identical ones are kept)
    if fsx.read_json(fs, f"{path}/{LISTING_NAME}")[0] == listing:
        return target
    log.info("making shards of %s in %s", image_dir, target)
    # this folder is ours, made for this image folder: its shards follow the images (identical ones are kept)
    make_shards(image_dir, target, maxcount=SHARD_SIZE, storage_options=storage_options, overwrite=True)
    # written last: shards made by a run that died half-way are checked again next time
    fsx.write_json_atomic(fs, f"{path}/{LISTING_NAME}", listing)
    return target
