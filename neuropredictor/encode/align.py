"""The features side and its alignment with the neural data: open a store, choose layers, match
stimuli by key (reporting what is dropped), split them into train/test, read one layer's rows."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from neuropredictor.encode._common import _EXAMPLES, AlignmentWarning, EncodingError, _duplicates, _fmt
from neuropredictor.encode.neural import NeuralData


def open_dataset(features: Any, storage_options: Mapping | None) -> tuple[Any, list[str], str]:
    """The Dataset, its layers in model order (as `open_features` lists them), and a printable name."""
    import xarray as xr

    if not isinstance(features, (xr.Dataset, str, os.PathLike)):
        raise EncodingError(f"features must be a features store (path or URL) or an xarray Dataset shaped like "
                            f"`open_features`' result, not a {type(features).__name__}; for arrays of your own, "
                            "use `encode_layer(X_train, Y_train, X_test, Y_test)`")
    if not isinstance(features, xr.Dataset):
        from neuropredictor.store import open_features

        features = open_features(os.fspath(features), dict(storage_options) if storage_options else None)
    return features, [str(v) for v in features.data_vars if v != "valid"], str(features.attrs.get("store", "<dataset>"))


def select_layers(layers: Any, order: list[str]) -> list[str]:
    if not order:
        raise EncodingError("the features hold no layer variables")
    if layers is None:
        return list(order)
    wanted = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else [str(s) for s in layers]
    wanted = [w for w in wanted if w]
    unknown = [w for w in wanted if w not in order]
    if unknown:
        raise EncodingError(f"layers {_fmt(unknown)} are not in the features store; it has {', '.join(order)}")
    if not wanted:
        raise EncodingError("no layers given")
    return [n for n in order if n in wanted]  # model order, whatever order they were asked in


def align(ds: Any, neural: NeuralData, complete: bool = False) -> dict[str, Any]:
    """Match neural rows to feature rows by key; report and drop what cannot be used: stimuli not measured
    for any target (NaN), or with `complete` (an RDM needs every target) for some target."""
    if "key" not in ds.coords and "key" not in ds:
        raise EncodingError("the features dataset has no `key` coordinate on `stimulus`; open stores with "
                            "neuropredictor.store.open_features")
    fkeys = [str(k) for k in np.asarray(ds["key"].values).tolist()]
    valid = np.asarray(ds["valid"].values, dtype=bool) if "valid" in ds else np.ones(len(fkeys), bool)
    # Rows never written keep an empty key; they are not stimuli.
    present = np.array([bool(k) for k in fkeys]) | valid
    dupes = _duplicates([k for k, p in zip(fkeys, present) if p])
    if dupes:
        raise EncodingError(f"the features store has {len(dupes)} keys on more than one row (e.g. {_fmt(dupes)}); "
                            "the corpus must have unique keys")
    fpos = {k: i for i, k in enumerate(fkeys) if present[i]}
    npos = {k: i for i, k in enumerate(neural.keys)}
    common = [k for k in fpos if k in npos]  # feature order: reads go along the store
    features_only = [k for k in fpos if k not in npos]
    neural_only = [k for k in neural.keys if k not in fpos]
    if not common:
        raise EncodingError(
            f"no stimulus key is in both the features ({len(fpos)} keys, e.g. {_fmt(list(fpos))}) and the neural "
            f"data ({len(npos)} keys, e.g. {_fmt(neural.keys)})." + key_hint(list(fpos), neural.keys)
            + KEYS_RULE)

    values = neural.values
    missing = ~np.isfinite(values)  # NaN marks a missing measurement; inf is no measurement either
    all_nan_targets = missing.all(0)
    if all_nan_targets.all():
        raise EncodingError("every target of the neural data is NaN for every stimulus")
    usable = np.flatnonzero(~all_nan_targets)
    fi = np.array([fpos[k] for k in common], dtype=np.int64)
    ni = np.array([npos[k] for k in common], dtype=np.int64)
    ok_valid = valid[fi]
    measured = ~missing[np.ix_(ni, usable)]
    ok_nan = measured.all(1) if complete else measured.any(1)
    invalid = [common[i] for i in np.flatnonzero(~ok_valid)]
    nan_rows = [common[i] for i in np.flatnonzero(ok_valid & ~ok_nan)]
    keep = ok_valid & ok_nan
    fi, ni = fi[keep], ni[keep]

    def entry(keys: list[str], why: str) -> dict[str, Any]:
        return {"count": len(keys), "examples": keys[:_EXAMPLES], "why": why}

    dropped = {
        "features_only": entry(features_only, "stimulus in the features store but not in the neural data"),
        "neural_only": entry(neural_only, "stimulus in the neural data but not in the features store"),
        "invalid_features": entry(invalid, "features row not valid (an undecodable image, or a shard not "
                                            "committed yet: `neuropredictor inspect` shows which)"),
        # a store still being extracted: its rows without data have no key yet, so their stimuli also count
        # as neural only above; this says why
        "not_extracted": {"count": int((~present).sum()), "examples": [],
                          "why": "features rows without data yet (shards not extracted, or the store not "
                                 "finalized): finish the extraction, then encode"},
        "nan_neural": entry(nan_rows, "neural row has NaN (or inf) in a target that is not NaN everywhere: the "
                                      "stimulus is left out for every target (an RDM needs them all)" if complete
                            else "neural row NaN (or inf) for every target"),
        "nan_targets": entry([neural.targets[i] for i in np.flatnonzero(all_nan_targets)],  # type: ignore[index]
                             "target NaN (or inf) for every stimulus (scores stay NaN)"),
    }
    report = {"n_features_rows": len(fpos), "n_neural_rows": neural.n_stimuli, "n_matched": int(len(fi)),
              "dropped": dropped}
    labels = {k: k.replace("_", " ") for k in dropped}
    if dropped["not_extracted"]["count"]:  # those stimuli may well be in the corpus: say so where they are counted
        dropped["neural_only"]["why"] += ", or in its rows not extracted yet"
        labels["neural_only"] = "neural only or not extracted yet"
    lines = [f"{v['count']} {labels[k]}" + (f" (e.g. {_fmt(v['examples'])})" if v["examples"] else f" ({v['why']})")
             for k, v in dropped.items() if v["count"]]
    if lines:
        msg = f"matched {len(fi)} stimuli; dropped: " + "; ".join(lines)
        warnings.warn(msg, AlignmentWarning, stacklevel=3)
    if len(fi) == 0:
        raise EncodingError(f"no usable stimulus left after alignment: {len(invalid)} matched rows are invalid in "
                            f"the features store and {len(nan_rows)} have NaN in the neural data")
    return {"features_rows": fi, "neural_rows": ni, "targets": usable, "report": report}


KEYS_RULE = (" Keys must equal the corpus keys (`neuropredictor shards` names samples by their relative path "
             "without extension).")


def key_hint(fkeys: list[str], nkeys: list[str]) -> str:
    """Say so when the keys would match after stripping folders / extensions, or leading zeros."""
    def norm(k: str) -> str:
        base = k.replace("\\", "/").rsplit("/", 1)[-1]
        return base.rsplit(".", 1)[0] if "." in base else base

    fn = {norm(k) for k in fkeys}
    hits = sum(norm(k) in fn for k in nkeys)
    if hits:
        return (f" {hits} neural keys would match after dropping folders and file extensions: write the keys "
                "exactly as stored (e.g. 'cat0/img0001', no extension).")
    def number(k: str) -> str:
        return k.lstrip("0") or "0"

    unpadded = {number(k): k for k in fkeys if k.isdigit()}
    padded = [(k, unpadded[number(k)]) for k in nkeys if k.isdigit() and number(k) in unpadded]
    if padded:
        return (f" {len(padded)} neural keys would match if zero-padded as the stored keys are (e.g. "
                f"{padded[0][0]!r} is stored as {padded[0][1]!r}): write the keys exactly as stored.")
    return ""


# How random and K-fold splits place the stimuli (recorded with the scores: scores made by another scheme
# are on other splits, and a sweep scores its models again rather than compare them across schemes)
SPLIT_SCHEME = "key-hash/1"


def _hash_order(labels: Sequence[str], seed: int) -> np.ndarray:
    """The order of labels by a hash of the seed and the label: a random order that depends on nothing else."""
    return np.argsort([hashlib.blake2b(f"{seed}|{k}".encode(), digest_size=8).digest() for k in labels],
                      kind="stable")


def _group_places(groups: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the middle of its group's place when the groups are laid end to end in hash order (in
    stimuli, 0..n), and its group's index. Splitting this line cuts between groups, never through one, and a
    stimulus more or less moves only the groups at a cut (as the keys' hash order does ungrouped)."""
    labels, inverse, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True,
                                        return_counts=True)
    order = _hash_order(labels.tolist(), seed)
    ends = np.empty(len(labels))
    ends[order] = np.cumsum(counts[order])
    middle = ends - counts / 2.0
    return middle[inverse], inverse


def grouped_folds(groups: Sequence[str], k: int, seed: int, what: str = "stimuli") -> list[np.ndarray]:
    """k disjoint sets of row indices, whole groups each, about equal in stimuli (within a group's size)."""
    n_groups = len(set(groups))
    if n_groups < k:
        raise EncodingError(f"the {what} fall in {n_groups} groups, fewer than the {k} folds asked for: "
                            "use fewer folds, or finer groups")
    middle, _ = _group_places(groups, seed)
    fold = np.minimum((middle * k / len(groups)).astype(int), k - 1)
    parts = [np.flatnonzero(fold == i) for i in range(k)]
    if any(len(p) == 0 for p in parts):
        raise EncodingError(f"the groups of the {what} are too unequal in size for {k} folds (one group holds "
                            "more than a fold's share): use fewer folds")
    return parts


def inner_group_folds(groups: Sequence[str], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The alpha search's (train, test) folds over one outer fold's training stimuli, by group."""
    parts = grouped_folds(groups, k, seed, "training stimuli of a fold")
    return [(np.sort(np.concatenate([p for j, p in enumerate(parts) if j != i])), parts[i]) for i in range(k)]


def outer_splits(keys: list[str], train: np.ndarray | None, test_fraction: float, folds: int | None,
                 seed: int, groups: Sequence[str] | None = None) -> dict[str, Any]:
    """The held-out designs: the data's own split (train), K folds, or a random test fraction; with groups, a
    group is never on both sides."""
    n = len(keys)
    if train is not None:
        if folds:
            raise EncodingError("the neural data has its own train/test split; drop it or folds=, "
                                "not both")
        if groups is not None:
            labels = np.asarray(groups, dtype=object)
            straddle = sorted(set(labels[train].tolist()) & set(labels[~train].tolist()))
            if straddle:
                raise EncodingError(f"{len(straddle)} groups have stimuli on both sides of the given split (e.g. "
                                    f"{_fmt(straddle)}): fix the split, or drop groups= to use it as it is")
        tr, te = np.flatnonzero(train), np.flatnonzero(~train)
        if len(tr) < len(te):
            warnings.warn(f"the given split trains on {len(tr)} stimuli and tests on {len(te)}: check which way it "
                          "points (a boolean column's name says whether True is train or test)", AlignmentWarning,
                          stacklevel=3)
        return {"splits": [(tr, te)], "how": "given", "n_train": len(tr), "n_test": len(te)}
    if folds:
        k = int(folds)
        if k < 2 or k > n:
            raise EncodingError(f"folds must be between 2 and the number of stimuli ({n}), not {k}")
    if groups is not None:
        if folds:
            parts = grouped_folds(groups, k, seed)
        else:
            middle, _ = _group_places(groups, seed)
            test = middle < n * float(test_fraction)
            parts = [np.flatnonzero(test), np.flatnonzero(~test)]
    else:
        # Random, but each key's place is a function of the seed and the key alone: rows in another order split
        # the same, and a stimulus one model could not use (an invalid image) moves no other between train and
        # test, so models compared on one neural data set share their splits but for the stimuli they lack.
        perm = _hash_order(keys, seed)
        if folds:
            parts = np.array_split(perm, k)
        else:
            n_test = int(round(n * float(test_fraction)))
            parts = [perm[:n_test], perm[n_test:]]
    if folds:
        splits = [(np.sort(np.concatenate([p for j, p in enumerate(parts) if j != i])), np.sort(parts[i]))
                  for i in range(k)]
        return {"splits": splits, "how": f"{k}-fold", "n_train": n - len(parts[0]), "n_test": len(parts[0])}
    te, tr = np.sort(parts[0]), np.sort(parts[1])
    return {"splits": [(tr, te)], "how": f"random {test_fraction:g} (seed {seed})", "n_train": len(tr),
            "n_test": len(te)}


def layer_matrix(ds: Any, layer: str, rows: np.ndarray, keys: list[str]) -> np.ndarray:
    """(len(rows), n_features) float32 for the matched rows of one layer."""
    var = ds[layer]
    if var.dims[0] != "stimulus":
        raise EncodingError(f"layer {layer!r} has dims {var.dims}; the first must be 'stimulus'")
    X = np.asarray(var.isel(stimulus=rows).values)
    X = X.reshape(len(rows), -1).astype(np.float32, copy=False)
    bad = ~np.isfinite(X).all(1)
    if bad.any():
        ex = [keys[i] for i in np.flatnonzero(bad)[:_EXAMPLES]]
        raise EncodingError(f"layer {layer!r}: {int(bad.sum())} valid stimuli have NaN/inf features (e.g. {_fmt(ex)}); "
                            "leave the layer out, or drop those rows (mark them not valid); from a float16 store "
                            "(which can overflow): re-extract with dtype float32")
    return X
