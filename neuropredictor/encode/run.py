"""A whole run: every layer of a features store scored against the neural data (`encode`), and the
CLI's load -> encode -> save -> plot (`encode_command`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from neuropredictor.encode._common import EncodingError
from neuropredictor.encode.align import _align, _layer_matrix, _open_features, _outer_splits, _select_layers
from neuropredictor.encode.neural import NeuralData, load_neural
from neuropredictor.encode.options import parse_alphas
from neuropredictor.encode.report import save_outputs
from neuropredictor.encode.ridge import _DEFAULT_BATCH_BYTES, _MIN_TRAIN, _check_alphas, encode_layer

if TYPE_CHECKING:  # pragma: no cover
    import xarray

log = logging.getLogger(__name__)

_MIN_TEST = 3  # Pearson r on fewer held-out stimuli is meaningless


def encode(features: str | xarray.Dataset, neural: NeuralData | str, layers: str | Sequence[str] | None = None,
           alphas: Sequence[float] | np.ndarray | None = None, test_fraction: float = 0.2, n_folds: int = 5,
           seed: int = 0, device: str = "auto", ceiling: Sequence[float] | np.ndarray | None = None,
           storage_options: Mapping | None = None, *, outer_folds: int | None = None, dtype: str = "float32",
           solver: str = "auto", batch_bytes: int = _DEFAULT_BATCH_BYTES) -> xarray.Dataset:
    """Score every layer of a features store as an encoding model of the neural data.

    features: a store URL (read with `open_features`) or a Dataset shaped like its result.
    neural: NeuralData, or a path given to `load_neural` (keys inside the file).
    layers: names (list or "a,b"); default every layer, in model order.
    alphas: ridge grid (default DEFAULT_ALPHAS); the alpha is chosen per target and layer by
        `n_folds`-fold cross-validation on the training stimuli only.
    Held-out stimuli: the neural data's own split if it has one; else `outer_folds` folds (every
        stimulus is held out once; scores are averaged over folds, `alpha` is the median of the
        folds' choices); else a random `test_fraction` of the stimuli. Random splits depend only on
        the seed and the set of matched keys (not on row order).
    ceiling: per-target noise ceiling in r (overrides the neural data's): adds
        r_normalized = r / ceiling (NaN where the ceiling is not positive).
    device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N", "numpy".

    Returns an xarray Dataset: r, r2, alpha (layer x target), r_normalized if a ceiling is known;
    coordinates layer, target, roi (per target, if known), n_features (per layer); attrs hold the
    alignment report (stimuli matched/dropped per reason with examples, n_train, n_test) and the
    settings. Targets that are NaN for every stimulus keep NaN scores.
    """
    import xarray as xr

    t0 = time.perf_counter()
    ds, layer_order, features_name = _open_features(features, storage_options)
    if not isinstance(neural, NeuralData):
        neural = load_neural(neural, storage_options=storage_options)
    layers = _select_layers(layers, layer_order)
    alphas = _check_alphas(alphas)
    if not 0.0 < float(test_fraction) < 1.0:
        raise EncodingError(f"test_fraction must be between 0 and 1 (exclusive), not {test_fraction}")

    aligned = _align(ds, neural)
    fi, ni, report, usable = aligned["features_rows"], aligned["neural_rows"], aligned["report"], aligned["targets"]
    Y = neural.values[np.ix_(ni, usable)]
    keys = [neural.keys[i] for i in ni]
    folds = _outer_splits(keys, neural.train[ni] if neural.train is not None else None, test_fraction,
                          outer_folds, seed)
    report["split"] = folds["how"]
    report["n_train"], report["n_test"] = folds["n_train"], folds["n_test"]
    for tr, te in folds["splits"]:
        if len(tr) < max(_MIN_TRAIN, 2 * n_folds) or len(te) < _MIN_TEST:
            raise EncodingError(f"after alignment the split leaves {len(tr)} training and {len(te)} test "
                                f"stimuli; need at least {max(_MIN_TRAIN, 2 * n_folds)} and {_MIN_TEST}. "
                                "Check the split, or lower n_folds / change test_fraction")

    ceil = neural.ceiling if ceiling is None else np.asarray(ceiling, dtype=np.float64).reshape(-1)
    if ceil is not None and ceil.shape != (neural.n_targets,):
        raise EncodingError(f"{ceil.size} noise-ceiling values for {neural.n_targets} targets")

    T = neural.n_targets
    r = np.full((len(layers), T), np.nan)
    r2 = np.full((len(layers), T), np.nan)
    alpha = np.full((len(layers), T), np.nan)
    n_feat, solvers = [], []
    backend_name = None
    for li, layer in enumerate(layers):
        X = _layer_matrix(ds, layer, fi, keys)
        n_feat.append(int(X.shape[1]))
        rs, r2s, als = [], [], []
        for tr, te in folds["splits"]:
            res = encode_layer(X[tr], Y[tr], X[te], Y[te], alphas, n_folds, seed=seed, device=device,
                               dtype=dtype, solver=solver, batch_bytes=batch_bytes)
            rs.append(res["r"])
            r2s.append(res["r2"])
            als.append(res["alpha"])
        solvers.append(res["solver"])
        backend_name = res["backend"]
        r[li, usable] = np.mean(rs, axis=0)
        r2[li, usable] = np.mean(r2s, axis=0)
        alpha[li, usable] = np.median(als, axis=0)
        log.info("layer %s: %d features, median r %.3f (%s, %s)", layer, X.shape[1],
                 float(np.nanmedian(r[li])) if np.isfinite(r[li]).any() else float("nan"), res["solver"],
                 backend_name)
        del X

    coords: dict[str, Any] = {"layer": ("layer", list(layers)), "target": ("target", list(neural.targets or [])),
                              "n_features": ("layer", np.asarray(n_feat, dtype=np.int64))}
    if neural.roi is not None:
        coords["roi"] = ("target", list(neural.roi))
    data_vars: dict[str, Any] = {
        "r": (("layer", "target"), r, {"long_name": "Pearson r, held-out stimuli"}),
        "r2": (("layer", "target"), r2, {"long_name": "R^2, held-out stimuli"}),
        "alpha": (("layer", "target"), alpha, {"long_name": "ridge alpha chosen by inner cross-validation"}),
    }
    if ceil is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            rn = np.where(ceil[None, :] > 0, r / ceil[None, :], np.nan)
        data_vars["r_normalized"] = (("layer", "target"), rn, {"long_name": "r / noise ceiling"})
        data_vars["ceiling"] = (("target",), ceil, {"long_name": "noise ceiling (r)"})
    out = xr.Dataset(data_vars, coords=coords)
    attrs = {
        "features": features_name,
        "neural": str(neural.source) if neural.source else "",
        "n_stimuli": int(len(ni)),
        "n_train": int(folds["n_train"]),
        "n_test": int(folds["n_test"]),
        "split": folds["how"],
        "outer_folds": int(outer_folds or 0),
        "inner_folds": int(n_folds),
        "seed": int(seed),
        "test_fraction": float(test_fraction),
        "alphas": [float(a) for a in alphas],
        "solver": ",".join(sorted(set(solvers))),
        "backend": str(backend_name),
        "dtype": dtype,
        "seconds": round(time.perf_counter() - t0, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "alignment": json.dumps(report),
    }
    for reason, entry in report["dropped"].items():
        attrs[f"dropped_{reason}"] = int(entry["count"])
    out.attrs.update(attrs)
    return out


def encode_command(features: str, neural: str, out: str, keys: str | None = None, key_column: str = "key",
                   split: str | None = None, layers: str | None = None, *, folds: int | None = None,
                   alphas: str | None = None, test_fraction: float = 0.2, n_folds: int = 5, seed: int = 0,
                   device: str = "auto", targets: str | None = None, roi: str | None = None,
                   ceiling: str | None = None, array: str | None = None, plot: str | None = None,
                   overwrite: bool = False, storage_options: Mapping | None = None) -> dict[str, Any]:
    """load_neural -> encode -> save_scores(out) -> plot_scores -> a JSON-able summary.

    Meant for `neuropredictor encode FEATURES NEURAL --out OUT`, with options:
      FEATURES          features store URL (argument)
      NEURAL            neural data file: .npy .npz .csv .nc .zarr (argument)
      --out             where the scores go (Zarr store path/URL; required)
      --keys            text file of stimulus keys, one per line (required for .npy)
      --key-column      csv column / npz array / nc-zarr coordinate holding the keys (default key)
      --split           train/test: a column/array/variable name in NEURAL, or a text file of test keys
      --folds           K outer folds instead of one split (every stimulus held out once)
      --layers          comma-separated layer names (default: all)
      --alphas          ridge grid: "1,10,100" or "logspace:-2:6:17" (default logspace:-2:6:17)
      --test-fraction   held-out fraction when no split/folds (default 0.2)
      --inner-folds     folds of the alpha search on the training stimuli (n_folds, default 5)
      --seed            random split and fold seed (default 0)
      --device          auto | cpu | cuda | cuda:N | numpy (default auto)
      --targets         target names: a name inside NEURAL or a text file
      --roi             ROI label per target: a name inside NEURAL or a text file
      --ceiling         noise ceiling per target (r): a name inside NEURAL, a .npy or text file
      --array           which array/variable of NEURAL holds the data, if several
      --plot            PNG path (default OUT + ".png")
      --overwrite       replace an existing OUT
    Errors are EncodingError (a NeuroPredictorError): print the message and exit non-zero.

    Returns {"scores": out, "plot": png, "layers": {layer: median r}, "best_layer": layer,
    "best_layer_per_roi": {roi: layer} (empty without ROIs), "n_train", "n_test", "dropped": {reason: count}}.
    """
    neural_data = load_neural(neural, keys=keys, key_column=key_column, split=split, targets=targets, roi=roi,
                              ceiling=ceiling, array=array, storage_options=storage_options)
    scores = encode(features, neural_data, layers=layers, alphas=parse_alphas(alphas), test_fraction=test_fraction,
                    n_folds=n_folds, seed=seed, device=device, storage_options=storage_options, outer_folds=folds)
    return save_outputs(scores, out, plot=plot, overwrite=overwrite, storage_options=storage_options)
