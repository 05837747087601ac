"""Representational similarity analysis: layer RDMs against the neural RDM."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from neuropredictor.encode._common import ALL_TARGETS, EncodingError
from neuropredictor.encode.align import align, layer_matrix, open_dataset, select_layers
from neuropredictor.encode.neural import NeuralData, load_neural
from neuropredictor.encode.ridge import pearson_r

if TYPE_CHECKING:  # pragma: no cover
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


def rsa(features: str | xarray.Dataset, neural: NeuralData | str | None = None, layers: Any = None, *,
        neural_rdm: np.ndarray | None = None, rdm_keys: Sequence[str] | None = None,
        by_roi: bool = True, storage_options: Mapping | None = None) -> xarray.Dataset:
    """Representational similarity of each layer to the neural data.

    Each layer's RDM (1 - Pearson r between stimulus patterns) is compared with the neural RDM by
    Spearman correlation of the upper triangles. The neural RDM is computed the same way from the
    neural data (all targets; and per ROI when the data has ROIs and by_roi), or given directly as
    neural_rdm (n x n) with its rdm_keys. Stimuli are aligned by key as in `encode`.

    Returns a Dataset: `rho` (layer), `rho_roi` (layer x roi) when per-ROI RDMs were made, attrs
    with the alignment report.
    """
    import xarray as xr
    from scipy.stats import rankdata

    ds, order, features_name = open_dataset(features, storage_options)
    layers = select_layers(layers, order)
    if neural_rdm is not None:
        if neural is not None:
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
        neural_data = neural if isinstance(neural, NeuralData) else load_neural(neural, storage_options=storage_options)
    aligned = align(ds, neural_data, complete=True)
    fi, ni, usable = aligned["features_rows"], aligned["neural_rows"], aligned["targets"]
    if len(fi) < 3:
        raise EncodingError(f"RSA needs at least 3 matched stimuli; have {len(fi)}")
    keys = [neural_data.keys[i] for i in ni]
    iu = np.triu_indices(len(fi), k=1)

    def ranked(d: np.ndarray) -> np.ndarray:
        """Ranks of the upper triangle; pairs with a constant pattern (NaN) stay NaN: ranked with them,
        every rank would be NaN."""
        values = d[iu]
        ok = np.isfinite(values)
        out = np.full(values.shape, np.nan)
        out[ok] = rankdata(values[ok])
        return out

    targets: dict[str, np.ndarray] = {}
    if neural_rdm is not None:
        targets[ALL_TARGETS] = ranked(np.asarray(neural_rdm, dtype=np.float64)[np.ix_(ni, ni)])
    else:
        Y = neural_data.values[np.ix_(ni, usable)]
        targets[ALL_TARGETS] = ranked(rdm(Y))
        if by_roi and neural_data.roi is not None:
            rois = np.asarray(neural_data.roi)[usable]
            for roi in dict.fromkeys(rois.tolist()):
                targets[str(roi)] = ranked(rdm(Y[:, rois == roi]))
    rho = np.full((len(layers), len(targets)), np.nan)
    for li, layer in enumerate(layers):
        lr = ranked(rdm(layer_matrix(ds, layer, fi, keys)))
        for ti, nr in enumerate(targets.values()):
            ok = np.isfinite(lr) & np.isfinite(nr)
            if ok.sum() > 2:
                # Spearman = Pearson on ranks (ties averaged); NaN pairs (constant patterns) left out
                a, b = lr[ok], nr[ok]
                if not ok.all():
                    a, b = rankdata(a), rankdata(b)
                rho[li, ti] = pearson_r(a[:, None], b[:, None])[0]
    data_vars: dict[str, Any] = {"rho": (("layer",), rho[:, 0], {"long_name": "Spearman rho, layer RDM vs neural RDM"})}
    coords: dict[str, Any] = {"layer": list(layers)}
    if len(targets) > 1:
        data_vars["rho_roi"] = (("layer", "roi"), rho[:, 1:], {"long_name": "Spearman rho per ROI"})
        coords["roi"] = list(targets)[1:]
    out = xr.Dataset(data_vars, coords=coords)
    out.attrs.update({"features": features_name, "neural": str(neural_data.source or ""), "n_stimuli": int(len(fi)),
                      "rdm": "1 - Pearson r", "comparison": "Spearman, upper triangle",
                      "alignment": json.dumps(aligned["report"])})
    return out
