"""Reading a store as an xarray Dataset, trusting only the rows of committed shards."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from neuropredictor.redact import redact_text
from neuropredictor.status import StoreStatus
from neuropredictor.store.feature_store import FeatureStore
from neuropredictor.store.layout import FEATURES, KEYS, STIMULUS, VALID, quiet_zarr

if TYPE_CHECKING:  # pragma: no cover
    import xarray

log = logging.getLogger(__name__)


def open_features(url: str | os.PathLike, storage_options: dict | None = None,
                  committed_only: bool = True) -> xarray.Dataset:
    """xarray Dataset: one data variable per layer, in the model's order (dims stimulus, ...), `valid`
    variable, and `key` coordinate on `stimulus` taken from `keys`.

    With committed_only, rows of shards without a commit record are marked invalid (valid False):
    their chunks may be half written. (Rows of committed shards that fall in a boundary chunk read
    as invalid until `finalize` has merged them.) Lazy: the feature variables are read on access
    (no dask needed); keys and valid are loaded.
    """
    import xarray as xr

    url = os.fspath(url)
    store = FeatureStore.open(url, storage_options, mode="r")
    zs = store.zarr_store()
    # Consolidated metadata exists once finalize ran; before that, read each array's own metadata.
    consolidated = StoreStatus(store.manifest.get("status")).finalized
    with quiet_zarr():
        feats = xr.open_zarr(zs, group=FEATURES, chunks=None, consolidated=consolidated, zarr_format=3)
        root = xr.open_zarr(zs, chunks=None, consolidated=consolidated, zarr_format=3)
        keys = np.asarray(root[KEYS].values, dtype=object)
        valid = np.asarray(root[VALID].values, dtype=bool).copy()
    commits = store.committed() if committed_only else None
    if commits is not None:  # the plan's shards tile the rows, so this leaves out every row not committed
        for s in store.shards:
            if s.name not in commits:
                valid[s.offset:s.end] = False
        for lo, hi in store.staging.waiting_rows(store.shards, {n: rec.get("staging") for n, rec in commits.items()}):
            valid[lo:hi] = False  # some array's rows there are fill, or an earlier attempt's, until finalize
        written = store.valid_rows(commits) if not consolidated else 0
        if valid.sum() < written:
            log.warning("%s: %d valid rows of committed shards lie in chunks shared with other shards, which the "
                        "store's finalize fills: they read as invalid until then (run the same extraction again "
                        "to finalize it)", redact_text(url), written - int(valid.sum()))
    # the layers in the model's order (zarr lists a group's arrays alphabetically: layer10 before layer2)
    feats = feats[[lay.name for lay in store.layers]]
    ds = feats.assign({VALID: ((STIMULUS,), valid)}).assign_coords(key=((STIMULUS,), keys))
    ds.attrs.update({"store": redact_text(url), "status": str(store.current_status()),
                     "config_hash": store.manifest.get("config_hash"),
                     # which rows these are (None with rows not committed: nothing says what those hold)
                     "content": None if commits is None else store.content_id(commits)})
    return ds
