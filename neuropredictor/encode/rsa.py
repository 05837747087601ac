"""Representational similarity analysis: layer RDMs against the neural RDM."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from neuropredictor.encode._common import ALL_TARGETS, EncodingError
from neuropredictor.encode.align import align, layer_matrix, open_dataset, select_layers
from neuropredictor.encode.chance import CHANCE_QUANTILE, holm
from neuropredictor.encode.neural import NeuralData
from neuropredictor.encode.options import read_with

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    import xarray


_RDM_BLOCK = 2048  # features per block: rdm's float64 working copy is n x this, not a copy of the layer


def rdm(patterns: np.ndarray) -> np.ndarray:
    """Representational dissimilarity matrix: 1 - Pearson r between the rows (stimuli) of
    patterns (n, ...) -> (n, n). A constant row has NaN dissimilarities.

    Built from the rows' Gram matrix a block of features at a time (in float64), so a wide layer needs
    little memory beyond itself and the n x n result."""
    X = np.asarray(patterns).reshape(len(patterns), -1)
    n, p = X.shape
    blocks = [slice(j, j + _RDM_BLOCK) for j in range(0, p, _RDM_BLOCK)]
    mean = sum((X[:, cols].sum(1, dtype=np.float64) for cols in blocks), np.zeros(n)) / max(p, 1)
    gram = np.zeros((n, n))
    for cols in blocks:
        centred = X[:, cols].astype(np.float64) - mean[:, None]
        gram += centred @ centred.T
    norm = np.sqrt(np.diag(gram).copy())
    with np.errstate(invalid="ignore", divide="ignore"):
        gram /= norm[:, None]
        gram /= norm[None, :]
    constant = ~(norm > 0)
    gram[constant] = np.nan
    gram[:, constant] = np.nan
    d = np.subtract(1.0, gram, out=gram)
    np.fill_diagonal(d, 0.0)
    return d


_GATHER_BYTES = 2**28  # one batch of permuted neural RDMs (permutations x pairs, with their indices)


def rsa(features: str | xarray.Dataset, neural: NeuralData | str | None = None, layers: Any = None, *,
        neural_rdm: np.ndarray | None = None, rdm_keys: Sequence[str] | None = None,
        by_roi: bool = True, permutations: int = 1000, seed: int = 0, storage_options: Mapping | None = None,
        **reading: Any) -> xarray.Dataset:
    """Representational similarity of each layer to the neural data.

    Each layer's RDM (1 - Pearson r between stimulus patterns) is compared with the neural RDM by
    Spearman correlation of the upper triangles. The neural RDM is computed the same way from the
    neural data (all targets; and per ROI when the data has ROIs and by_roi), or given directly as
    neural_rdm (n x n) with its rdm_keys. Stimuli are aligned by key as in `encode`; with neural a file,
    `reading` says how to read it (`EncodeOptions`' keys_file, roi, array, ...).

    Stimuli whose pattern is constant (in the layer or the neural data) have no correlation distance: their
    pairs are left out, as are pairs a given neural_rdm lacks (NaN).

    The chance test permutes the stimuli of the neural RDM (rows and columns together: a Mantel test), the
    same `permutations` for every layer: p = (1 + permutations with rho at least as high) / (1 + permutations),
    one-sided, not adjusted for the number of layers (`rsa_table` adds Holm's adjustment). 0 skips it; a
    given RDM that lacks some pairs is not tested (p NaN).

    Returns a Dataset: `rho` and `p` (layer), `rho_roi` and `p_roi` (layer x roi) when per-ROI RDMs were
    made, attrs with the alignment report and the test.
    """
    import xarray as xr

    ds, order, features_name = open_dataset(features, storage_options)
    layers = select_layers(layers, order)
    if neural_rdm is not None:
        if neural is not None or reading:
            raise EncodingError("give either neural data or neural_rdm, not both")
        m = np.asarray(neural_rdm, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise EncodingError(f"neural_rdm must be square (n x n); got shape {m.shape}")
        if rdm_keys is None:
            raise EncodingError("neural_rdm needs rdm_keys: the stimulus key of each row/column")
        # keys and a dummy target: alignment (and its checks) treats the RDM like data rows
        neural_data = NeuralData(np.zeros((m.shape[0], 1)), list(rdm_keys), source="neural_rdm")
    else:
        if neural is None:
            raise EncodingError("give neural data (NeuralData or a path) or neural_rdm")
        neural_data = read_with(neural, reading, storage_options)
    if permutations < 0:
        raise EncodingError(f"permutations must be 0 (no test) or more; got {permutations}")
    aligned = align(ds, neural_data, complete=True)
    fi, ni, usable = aligned["features_rows"], aligned["neural_rows"], aligned["targets"]
    if len(fi) < 3:
        raise EncodingError(f"RSA needs at least 3 matched stimuli; have {len(fi)}")
    keys = [neural_data.keys[i] for i in ni]
    neural_rdms: dict[str, np.ndarray] = {}
    if neural_rdm is not None:
        neural_rdms[ALL_TARGETS] = np.asarray(neural_rdm, dtype=np.float64)[np.ix_(ni, ni)]
    else:
        Y = neural_data.values[np.ix_(ni, usable)]
        neural_rdms[ALL_TARGETS] = rdm(Y)
        if by_roi and neural_data.roi is not None:
            rois = np.asarray(neural_data.roi)[usable]
            for roi in dict.fromkeys(rois.tolist()):
                neural_rdms[str(roi)] = rdm(Y[:, rois == roi])
    n = len(fi)
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(n) for _ in range(permutations)]) if permutations else None
    rho = np.full((len(layers), len(neural_rdms)), np.nan)
    p = np.full_like(rho, np.nan)
    whole: list[tuple[int, np.ndarray]] = []  # layers without a constant pattern: tested together, per group
    for li, layer in enumerate(layers):
        d = rdm(layer_matrix(ds, layer, fi, keys))
        for gi, nd in enumerate(neural_rdms.values()):
            kept = _varied(d) & _varied(nd)
            if kept.sum() < 3:
                continue
            sub = np.ix_(kept, kept)
            rho[li, gi] = _spearman(d[sub], nd[sub])
            if orders is not None and not kept.all() and _complete(d[sub]) and _complete(nd[sub]):
                # its own stimuli, permuted apart from the others: the order of the first m of a permutation of
                # n is a permutation of m, as likely as any other
                p[li, gi] = _mantel(nd[sub], _unit_ranks(_upper(d[sub]))[:, None], orders[:, :kept.sum()].argsort(1),
                                    rho[li, gi:gi + 1])[0]
        if orders is not None and _complete(d):
            whole.append((li, _unit_ranks(_upper(d)).astype(np.float32)))
    if orders is not None:
        for gi, nd in enumerate(neural_rdms.values()):
            tested = [(li, z) for li, z in whole if np.isnan(p[li, gi]) and np.isfinite(rho[li, gi])]
            if tested and _complete(nd):
                rows = [li for li, _ in tested]
                p[rows, gi] = _mantel(nd, np.stack([z for _, z in tested], axis=1), orders, rho[rows, gi])
    data_vars: dict[str, Any] = {"rho": (("layer",), rho[:, 0], {"long_name": "Spearman rho, layer RDM vs neural RDM"})}
    coords: dict[str, Any] = {"layer": list(layers)}
    if permutations:
        data_vars["p"] = (("layer",), p[:, 0], {"long_name": "Mantel permutation p-value of rho, one-sided"})
    if len(neural_rdms) > 1:
        data_vars["rho_roi"] = (("layer", "roi"), rho[:, 1:], {"long_name": "Spearman rho per ROI"})
        if permutations:
            data_vars["p_roi"] = (("layer", "roi"), p[:, 1:], {"long_name": "Mantel p-value of rho per ROI"})
        coords["roi"] = list(neural_rdms)[1:]
    out = xr.Dataset(data_vars, coords=coords)
    out.attrs.update({"features": features_name, "neural": str(neural_data.source or ""), "n_stimuli": int(n),
                      "rdm": "1 - Pearson r", "comparison": "Spearman, upper triangle",
                      "permutations": int(permutations), "seed": int(seed),
                      "chance_test": "stimuli of the neural RDM permuted (Mantel), one-sided" if permutations
                      else "none", "alignment": json.dumps(aligned["report"])})
    return out


def _varied(d: np.ndarray) -> np.ndarray:
    """The stimuli whose pattern is not constant: a constant one has no correlation distance (NaN) to any other,
    and its pairs are left out (the RDM of the others)."""
    off = ~np.eye(len(d), dtype=bool)
    return ~(np.isnan(d) | ~off).all(1) if len(d) > 1 else np.ones(len(d), bool)


def _upper(d: np.ndarray) -> np.ndarray:
    """An RDM's upper triangle, its pairs."""
    return d[np.triu_indices(len(d), k=1)]


def _complete(d: np.ndarray) -> bool:
    return bool(np.isfinite(_upper(d)).all())


def _unit_ranks(values: np.ndarray) -> np.ndarray:
    """The ranks (ties averaged) of values, centred and scaled to unit norm: Spearman's rho of two is the sum of
    their products; NaN when they are all equal."""
    from scipy.stats import rankdata

    r = rankdata(values)
    r -= r.mean()
    norm = np.linalg.norm(r)
    return r / norm if norm > 0 else np.full_like(r, np.nan)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two RDMs' upper triangles, over the pairs both have (a given RDM may lack some)."""
    x, y = _upper(a), _upper(b)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return float(_unit_ranks(x[ok]) @ _unit_ranks(y[ok]))


def _mantel(neural: np.ndarray, layers: np.ndarray, orders: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """One-sided p-values of each layer's rho (observed) against the neural RDM with its stimuli permuted by each
    row of orders (permutations, n). layers: the `_unit_ranks` of the layers' pairs as columns (pairs, layers). Permuting the
    stimuli moves the neural ranks between pairs and keeps their values, so each permutation's rho is one
    gather and one product."""
    n = len(neural)
    full = np.zeros((n, n), np.float32)
    iu = np.triu_indices(n, k=1)
    full[iu] = _unit_ranks(neural[iu])
    full += full.T
    flat, layers = full.ravel(), layers.astype(np.float32)
    step = max(1, _GATHER_BYTES // (28 * len(iu[0])))  # per pair: three int64 index arrays, the float32 value
    above = np.zeros(layers.shape[1], np.int64)
    for i in range(0, len(orders), step):
        o = orders[i:i + step]
        null = flat[o[:, iu[0]] * n + o[:, iu[1]]] @ layers  # (permutations, layers)
        above += (null >= observed[None, :] - 1e-6).sum(0)  # float32 products: equal counts as at least as high
    return (1 + above) / (1 + len(orders))


def rsa_table(ds: xarray.Dataset) -> pandas.DataFrame:
    """Per (roi, layer) of an `rsa` Dataset, tidy: rho, p, p_holm (p adjusted by Holm over the layers), above_chance
    (p_holm at most 0.05; NA without a test) and best (the highest rho among the layers above chance; untested, among
    those whose rho is above 0: an RDM that does not correlate positively is the best of nothing). roi is
    "all" for the RDM of every target, then each ROI."""
    import pandas as pd

    layers = [str(x) for x in ds["layer"].values.tolist()]
    groups = [(ALL_TARGETS, ds["rho"].values, ds["p"].values if "p" in ds else None)]
    if "rho_roi" in ds:
        groups += [(str(roi), ds["rho_roi"].sel(roi=roi).values, ds["p_roi"].sel(roi=roi).values if "p_roi" in ds
                    else None) for roi in ds["roi"].values.tolist()]
    rows = []
    for roi, rho, p in groups:
        p = np.full(len(layers), np.nan) if p is None else np.asarray(p, dtype=np.float64)
        adjusted = holm(p)
        above = [bool(a <= 1 - CHANCE_QUANTILE) if np.isfinite(a) else None for a in adjusted]
        eligible = [i for i in range(len(layers)) if above[i] is True or (above[i] is None and rho[i] > 0)]
        best = max(eligible, key=lambda i: rho[i], default=-1)
        rows += [{"roi": roi, "layer": layer, "rho": float(rho[i]), "p": p[i], "p_holm": adjusted[i],
                  "above_chance": above[i], "best": i == best} for i, layer in enumerate(layers)]
    return pd.DataFrame(rows, columns=["roi", "layer", "rho", "p", "p_holm", "above_chance", "best"]).astype(
        {"above_chance": "boolean"})
