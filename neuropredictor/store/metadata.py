"""The zarr metadata (each group's and array's `zarr.json`) as a store's plan makes it: created when the
store is planned, checked by verify, and written again from the plan where it is damaged or lost.

A damaged `zarr.json` leaves its array's chunks intact but unreadable to every run; written again from the
plan, they read back as committed (the shards' checksums say so), and nothing is extracted again.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import zarr

from neuropredictor import fs as fsx
from neuropredictor.store.layout import (
    FEATURES,
    KEYS,
    STIMULUS,
    VALID,
    LayerSpec,
    compressors,
    dim_names,
    feature_path,
    quiet_zarr,
)

ZARR_JSON = "zarr.json"
# what a reader relies on; codec settings are compared by name only, as zarr versions spell them differently
_ARRAY_FIELDS = ("node_type", "zarr_format", "shape", "data_type", "chunk_grid", "fill_value",
                 "dimension_names", "attributes")
_GROUP_FIELDS = ("node_type", "zarr_format")


def layers_of(plan: Mapping) -> list[LayerSpec]:
    return [LayerSpec(d["name"], tuple(d["shape"]), d["reduction"]) for d in plan.get("layers", [])]


def create(zs: Any, layers: Iterable[LayerSpec], storage: Mapping) -> None:
    """Create the groups and every array of a plan (`storage`: the plan's dtype, compression, rows and
    chunk rows) in the zarr store zs; no chunk is written."""
    dtype, compression, total, chunk_rows = (storage["dtype"], storage["compression"], int(storage["rows"]),
                                             storage["chunk_rows"])
    zarr.open_group(zs, mode="a", zarr_format=3)
    zarr.open_group(zs, path=FEATURES, mode="a", zarr_format=3)
    for lay in layers:
        path = feature_path(lay.name)
        zarr.create_array(zs, name=path, shape=(total, *lay.shape), chunks=(chunk_rows[path], *lay.shape),
                          dtype=dtype, fill_value=np.nan, compressors=compressors(compression, True),
                          dimension_names=dim_names(lay), overwrite=True, zarr_format=3,
                          attributes={"layer": lay.name, "reduction": lay.reduction})
    for name, kind, fill in ((KEYS, str, ""), (VALID, bool, False)):
        zarr.create_array(zs, name=name, shape=(total,), chunks=(chunk_rows[name],), dtype=kind, fill_value=fill,
                          compressors=compressors(compression, False), dimension_names=(STIMULUS,),
                          overwrite=True, zarr_format=3)


def node_paths(plan: Mapping) -> list[str]:
    """The folders (in the store, each ending in `/`; the root is "") of the plan's groups and arrays."""
    return ["", f"{FEATURES}/", *(feature_path(lay.name) + "/" for lay in layers_of(plan)), f"{KEYS}/", f"{VALID}/"]


def planned(plan: Mapping) -> dict[str, dict]:
    """Every `zarr.json` of the plan (its path in the store -> the document), as zarr writes it for the
    plan now: made in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="neuropredictor-metadata-") as tmp, quiet_zarr():
        create(zarr.storage.LocalStore(tmp), layers_of(plan), plan["storage"])
        docs = {}
        for path in node_paths(plan):
            with open(f"{tmp}/{path}{ZARR_JSON}", encoding="utf-8") as f:
                docs[f"{path}{ZARR_JSON}"] = json.load(f)
        return docs


def damaged(fs: Any, root: str, docs: Mapping[str, dict]) -> dict[str, str]:
    """The `zarr.json` files of the store at root that a reader cannot use as the plan made them (`docs`:
    `planned`): path -> what is wrong (missing, not JSON, or a field that differs from the plan's)."""
    found = {}
    for path, want in docs.items():
        doc, unreadable = fsx.read_json(fs, f"{root}/{path}")
        if doc is None:
            found[path] = "not JSON (damaged)" if unreadable else "missing"
            continue
        fields = _GROUP_FIELDS if want.get("node_type") == "group" else _ARRAY_FIELDS
        wrong = [f for f in fields if doc.get(f) != want.get(f)]
        if "codecs" in want and _codec_names(doc) != _codec_names(want):
            wrong.append("codecs")
        if wrong:
            found[path] = f"differs from the plan in {', '.join(wrong)}"
    return found


def rewrite(fs: Any, root: str, docs: Mapping[str, dict], paths: Iterable[str]) -> None:
    """Write the given `zarr.json` files again as the plan makes them (`docs`: `planned`; the arrays' chunks
    are not touched; a group's consolidated metadata is made again by the next finalize)."""
    for path in paths:
        fsx.write_json_atomic(fs, f"{root}/{path}", docs[path])


def _codec_names(doc: Mapping) -> list[Any]:
    codecs = doc.get("codecs")
    if not isinstance(codecs, list):
        return [codecs]
    return [c.get("name") if isinstance(c, dict) else c for c in codecs]
