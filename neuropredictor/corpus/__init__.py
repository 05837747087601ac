"""WebDataset corpora: making shards from a folder, listing/counting shards, reading one shard.

Data path: tar shards (local dir, ``s3://``, any fsspec URL) -> :func:`list_shards` (count samples per
shard, assign global row offsets) -> :func:`read_shard` (decode + preprocess in DataLoader workers,
batches in tar order, with keys and per-sample validity).

    tar.py       member names and damage checks, by WebDataset's rules
    make.py      make_shards: a folder of images -> shards + offsets sidecars + index.json
    listing.py   list_shards: a corpus URL -> shards with counts and offsets; index_shards for other tools' shards
    offsets.py   each sample's byte range in its shard (a sidecar), for reads of exactly a worker's batches
    decode.py    one image -> a preprocessed tensor, or the reason it cannot be
    read.py      read_shard: the read path as stages, in DataLoader workers
"""

from neuropredictor.corpus.listing import index_shards, list_shards
from neuropredictor.corpus.make import (
           IMAGE_EXTENSIONS,
           INDEX_FORMAT,
           INDEX_NAME,
           make_shards,
)
from neuropredictor.corpus.read import Batch, read_shard
from neuropredictor.shard import Shard

__all__ = ["IMAGE_EXTENSIONS", "INDEX_FORMAT", "INDEX_NAME", "Batch", "Shard", "index_shards", "list_shards", "make_shards",
           "read_shard"]
