"""Zarr v3 store of one extraction run, on any fsspec location (local disk, s3://, ...).

    layout.py          object names, chunk planning, codecs, plan checks
    staging.py         the boundary-chunk protocol (no two writers ever write one object)
    records.py         commit and failure records (`_status/`)
    writer.py          one shard's attempt: rows -> chunks -> commit record
    metadata.py        the zarr metadata as the plan makes it: create, check, write again
    feature_store.py   create (plan) / open / finalize
    read.py            open_features: an xarray Dataset of the trusted rows
"""

from neuropredictor.store.feature_store import FeatureStore, ShardBusy, ShardCommitted
from neuropredictor.store.layout import DEFAULT_CHUNK_BYTES, LayerSpec, plan_chunk_rows
from neuropredictor.store.read import open_features
from neuropredictor.store.writer import ShardWriter

__all__ = ["DEFAULT_CHUNK_BYTES", "FeatureStore", "LayerSpec", "ShardBusy", "ShardCommitted", "ShardWriter",
           "open_features", "plan_chunk_rows"]
