"""Encoding models: how well each layer of a run predicts each voxel / neuron, and RSA.

    neural = load_neural("betas.npz", split="is_test")      # (stimuli x targets), keys inside
    scores = encode("runs/r1.zarr", neural)                  # xarray: r, r2, alpha (layer x target)
    summary_table(scores)                                    # median r per layer, best layer per ROI
    save_scores(scores, "runs/r1-scores.zarr"); plot_scores(scores, "runs/r1-scores.png")

Per layer: features flattened to (stimuli, features), standardised with the training stimuli's
mean/std only, then ridge regression for all targets at once with himalaya, alpha chosen per
target by an inner cross-validation on the training stimuli, and scored on held-out stimuli
(Pearson r and R^2). Stimuli are matched by key; whatever cannot be matched or used is reported
(counts and examples, in the result's attrs and as an `AlignmentWarning`) and dropped, never
silently misaligned.

`encode_layer` does the numerical work for one layer on plain arrays, so that a flow can run one
task per layer without xarray or a store.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from neuropredictor.errors import NeuroPredictorError

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    import xarray

__all__ = [
    "DEFAULT_ALPHAS",
    "AlignmentWarning",
    "EncodingError",
    "NeuralData",
    "encode",
    "encode_command",
    "encode_layer",
    "load_neural",
    "parse_alphas",
    "plot_scores",
    "rdm",
    "rsa",
    "save_scores",
    "summary_table",
]

log = logging.getLogger(__name__)

#: Default ridge grid: 1e-2 .. 1e6, two points per decade. On standardised features the useful
#: alpha grows with the number of features and the noise level, so the grid reaches far up.
DEFAULT_ALPHAS = np.logspace(-2, 6, 17)

NEURAL_FORMATS = (".npy", ".npz", ".csv", ".nc", ".zarr")
_EXAMPLES = 5  # keys quoted per reason in reports and messages
_MIN_TRAIN = 10  # fewer training stimuli than this cannot choose alpha by cross-validation sensibly
_MIN_TEST = 3  # Pearson r on fewer held-out stimuli is meaningless
_DEFAULT_BATCH_BYTES = 2**30  # size of one large intermediate of the solver (see _solver_batches)

# Names looked for inside containers (.npz arrays, .nc/.zarr variables) when not given explicitly.
_KEY_NAMES = ("key", "keys", "stimulus", "stimuli", "stimulus_id", "image", "images")
_TARGET_NAMES = ("target", "targets", "target_names", "voxel", "voxels", "neuroid", "neuroids")
_ROI_NAMES = ("roi", "rois", "region")
_CEILING_NAMES = ("ceiling", "noise_ceiling", "ceilings")
_DATA_NAMES = ("data", "values", "responses", "Y", "y", "betas")


class EncodingError(NeuroPredictorError):
    """Neural data or features cannot be loaded, aligned or fitted as asked."""


class AlignmentWarning(UserWarning):
    """Some stimuli or targets were dropped while matching neural data to features."""


# ---------------------------------------------------------------------------------------------
# Neural data


@dataclass
class NeuralData:
    """Neural responses for a set of stimuli.

    values: (n_stimuli, n_targets) float64; NaN marks a missing measurement.
    keys: the stimulus keys, one per row, matching the corpus keys of the features store.
    targets: a name per target (voxel id, neuron id); default "t0", "t1", ...
    roi: a label per target (for per-ROI summaries), or None.
    train: bool per row, True = training stimulus, or None (encode then splits by itself).
    ceiling: per-target noise ceiling in units of r (the largest correlation a perfect model could
        reach given the measurement noise), or None.
    source: where the data came from (for the record).
    """

    values: np.ndarray
    keys: list[str]
    targets: list[str] | None = None
    roi: list[str] | None = None
    train: np.ndarray | None = None
    ceiling: np.ndarray | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        if values.ndim == 1:
            values = values[:, None]  # one target
        if values.ndim != 2:
            raise EncodingError(f"neural data must be 2-D (stimuli x targets); got shape {values.shape}. "
                                "Reshape it (e.g. flatten voxels) before loading.")
        if not np.issubdtype(values.dtype, np.number) and values.dtype != bool:
            raise EncodingError(f"neural data must be numeric; got dtype {values.dtype}")
        self.values = values.astype(np.float64, copy=False)
        n, t = self.values.shape
        self.keys = [str(k) for k in self.keys]
        if len(self.keys) != n:
            raise EncodingError(f"{len(self.keys)} stimulus keys for {n} rows of neural data "
                                f"(shape {self.values.shape}): give exactly one key per row, in row order"
                                + ("" if n != t else " (or check the orientation: rows must be stimuli)"))
        dupes = _duplicates(self.keys)
        if dupes:
            raise EncodingError(f"{len(dupes)} stimulus keys appear more than once in the neural data "
                                f"(e.g. {_fmt(dupes)}): average repetitions per stimulus first, or give "
                                "unique keys")
        if self.targets is None:
            self.targets = [f"t{i}" for i in range(t)]
        self.targets = [str(x) for x in self.targets]
        if len(self.targets) != t:
            raise EncodingError(f"{len(self.targets)} target names for {t} targets (columns)")
        dupes = _duplicates(self.targets)
        if dupes:
            raise EncodingError(f"target names must be unique; repeated: {_fmt(dupes)}")
        if self.roi is not None:
            self.roi = [str(x) for x in self.roi]
            if len(self.roi) != t:
                raise EncodingError(f"{len(self.roi)} ROI labels for {t} targets: give one label per target")
        if self.train is not None:
            self.train = _as_bool(self.train, "train mask")
            if self.train.shape != (n,):
                raise EncodingError(f"train mask has shape {self.train.shape}; expected ({n},), one flag per row")
        if self.ceiling is not None:
            self.ceiling = np.asarray(self.ceiling, dtype=np.float64).reshape(-1)
            if self.ceiling.shape != (t,):
                raise EncodingError(f"{self.ceiling.size} noise-ceiling values for {t} targets: give one per target")

    @property
    def n_stimuli(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.values.shape[1])

    def permuted(self, seed: int = 0) -> NeuralData:
        """A copy with the keys shuffled against the rows: a null model (scores should be ~0)."""
        rng = np.random.default_rng(seed)
        keys = [self.keys[i] for i in rng.permutation(len(self.keys))]
        return NeuralData(self.values.copy(), keys, list(self.targets or []), self.roi, self.train,
                          self.ceiling, source=f"{self.source} (keys permuted, seed {seed})")


def load_neural(path: str | os.PathLike, keys: str | os.PathLike | Sequence[str] | None = None,
                key_column: str = "key", split: Any = None, *, targets: Any = None, roi: Any = None,
                ceiling: Any = None, array: str | None = None,
                storage_options: Mapping | None = None) -> NeuralData:
    """Read neural data (stimuli x targets) and its stimulus keys.

    path: `.npy`, `.npz`, `.csv`, `.nc` or `.zarr` (local or any fsspec URL).
    keys: the stimulus keys in row order: a list, or a text file with one key per line. Required
        for `.npy`; for the other formats it overrides keys stored in the file.
    key_column: where the keys are inside the file: the csv column, the `.npz` array, or the
        coordinate on the first dimension of a `.nc`/`.zarr` variable (default "key"; if absent,
        "keys", "stimulus", "stimuli", ... are tried, then the first dimension's own coordinate).
    split: the train/test split, one of
        - the name of a column (csv), array (npz) or variable/coordinate (nc/zarr) holding either
          booleans / 0-1 (True = train, unless the name contains "test": then True = test) or the
          strings "train"/"test";
        - a text file listing the test keys, one per line, or a list of test keys;
        - a bool array (True = train) or an array of "train"/"test" strings, one per row.
    targets: target names: a list, a text file (one per line) or a name inside the file. Default:
        csv column names, `targets` array (npz), the second dimension's coordinate (nc/zarr).
    roi: an ROI label per target: a list, a text file, or a name inside the file (`roi` is found
        automatically in npz/nc/zarr).
    ceiling: per-target noise ceiling (in r): a list/array, a `.npy` or text file, or a name inside
        the file (`ceiling`/`noise_ceiling` are found automatically in npz/nc/zarr).
    array: the data array (npz) / variable (nc/zarr) to read, when the file holds several 2-D ones.
    """
    spath = os.fspath(path)
    suffix = _suffix(spath)
    opts = dict(storage_options or {})
    if suffix == ".npy":
        with _open(spath, "rb", opts) as f:
            values = np.load(f, allow_pickle=False)
        container: dict[str, np.ndarray] = {}
        if keys is None:
            raise EncodingError(f"{spath}: a .npy file holds no stimulus keys; pass keys= (a list or a text "
                                "file with one key per line, CLI --keys) in row order, or use .npz/.csv/.nc")
    elif suffix == ".npz":
        values, container = _read_npz(spath, array, opts)
    elif suffix == ".csv":
        values, container, csv_targets = _read_csv(spath, key_column, split if isinstance(split, str) else None,
                                                   keys is None, opts)
        if targets is None:
            targets = csv_targets
    elif suffix in (".nc", ".zarr"):
        values, container = _read_xarray(spath, suffix, array, key_column, opts)
    else:
        raise EncodingError(f"unsupported neural data file {spath!r}: use one of {', '.join(NEURAL_FORMATS)}")

    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise EncodingError(f"{spath}: neural data has shape {values.shape}; expected 2-D (stimuli x targets)")
    n = values.shape[0]

    if keys is not None:
        key_list = _read_lines(keys, opts) if _is_pathlike(keys) else [str(k) for k in keys]
    else:
        found = _pick(container, key_column, _KEY_NAMES if key_column == "key" else ())
        if found is None:
            raise EncodingError(f"{spath}: no stimulus keys found (looked for {key_column!r}"
                                f"{' and ' + ', '.join(_KEY_NAMES) if key_column == 'key' else ''}; the file has "
                                f"{', '.join(sorted(container)) or 'nothing else'}). Pass keys= (CLI --keys) or "
                                "key_column= (CLI --key-column)")
        key_list = [str(k) for k in np.asarray(found).reshape(-1).tolist()]
    if len(key_list) != n:
        raise EncodingError(f"{spath}: {len(key_list)} keys for {n} rows of neural data (shape {values.shape}); "
                            "the key list must have one key per row, in row order")

    target_list = _resolve_per_target(targets, container, _TARGET_NAMES, "targets", opts)
    roi_list = _resolve_per_target(roi, container, _ROI_NAMES, "roi", opts)
    ceiling_arr = _resolve_ceiling(ceiling, container, opts)
    train = _resolve_split(split, container, key_list, opts, spath)
    return NeuralData(values, key_list, target_list, roi_list, train, ceiling_arr, source=spath)


def _read_npz(spath: str, array: str | None, opts: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with _open(spath, "rb", opts) as f:
        # Object arrays need pickle; key arrays saved from Python lists of str are '<U', no pickle.
        with np.load(f, allow_pickle=False) as z:
            container = {name: z[name] for name in z.files}
    if array is not None:
        if array not in container:
            raise EncodingError(f"{spath}: no array {array!r}; it has {', '.join(sorted(container))}")
        return container.pop(array), container
    candidates = [k for k, v in container.items() if v.ndim == 2 and np.issubdtype(v.dtype, np.number)]
    named = [k for k in _DATA_NAMES if k in container]
    if named:
        name = named[0]
    elif len(candidates) == 1:
        name = candidates[0]
    else:
        raise EncodingError(f"{spath}: cannot tell which array holds the data ({len(candidates)} 2-D numeric "
                            f"arrays: {', '.join(candidates) or 'none'}); pass array= (CLI --array)")
    return container.pop(name), container


def _read_csv(spath: str, key_column: str, split_column: str | None, need_keys: bool,
              opts: dict) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    import pandas as pd

    with _open(spath, "r", opts) as f:
        # keys stay strings ("001" must not become 1); everything else is parsed normally
        df = pd.read_csv(f, dtype={key_column: str})
    container: dict[str, np.ndarray] = {}
    if key_column in df.columns:
        container[key_column] = df.pop(key_column).astype(str).to_numpy()
    elif need_keys:
        raise EncodingError(f"{spath}: no key column {key_column!r}; columns are "
                            f"{_fmt(list(df.columns), 12)}. Pass key_column= (CLI --key-column) or keys=")
    if split_column is not None and split_column in df.columns:
        container[split_column] = df.pop(split_column).to_numpy()
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise EncodingError(f"{spath}: columns {_fmt(bad)} are not numeric; every column other than the key "
                            f"({key_column!r}) and the split must hold one target's responses. Remove them, "
                            "or name the key/split column with key_column= / split=")
    return df.to_numpy(dtype=np.float64), container, [str(c) for c in df.columns]


def _read_xarray(spath: str, suffix: str, array: str | None, key_column: str,
                 opts: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import xarray as xr

    if suffix == ".zarr":
        try:  # consolidated metadata is one read instead of one per array (matters on object stores)
            ds = xr.open_zarr(spath, storage_options=opts or None, chunks=None, consolidated=True)
        except (KeyError, ValueError, OSError):
            ds = xr.open_zarr(spath, storage_options=opts or None, chunks=None, consolidated=False)
    elif "://" in spath and not spath.startswith("file://"):
        with _open(spath, "rb", opts) as f:
            ds = xr.open_dataset(io.BytesIO(f.read())).load()
    else:
        ds = xr.open_dataset(spath).load()
    with contextlib.closing(ds):
        if isinstance(ds, xr.DataArray):  # pragma: no cover - open_dataset returns a Dataset
            ds = ds.to_dataset()
        if array is not None:
            if array not in ds.data_vars:
                raise EncodingError(f"{spath}: no variable {array!r}; it has {', '.join(map(str, ds.data_vars))}")
            name = array
        else:
            two_d = [str(k) for k, v in ds.data_vars.items() if v.ndim == 2]
            if len(two_d) != 1:
                raise EncodingError(f"{spath}: cannot tell which variable holds the data ({len(two_d)} 2-D "
                                    f"variables: {', '.join(two_d) or 'none'}); pass array= (CLI --array)")
            name = two_d[0]
        da = ds[name]
        stim_dim, target_dim = da.dims
        container: dict[str, np.ndarray] = {}
        # coordinates and 1-D variables along either dimension become findable by name
        for k, v in list(ds.coords.items()) + list(ds.data_vars.items()):
            if k == name or v.ndim != 1:
                continue
            container[str(k)] = np.asarray(v.values)
        for cand in ((key_column,) + (_KEY_NAMES if key_column == "key" else ())):
            if cand in container and ds[cand].dims == (stim_dim,):
                break
        else:
            # the first dimension's own coordinate, when it holds the keys (`stimulus: ["a", "b"]`)
            if stim_dim in ds.coords and np.asarray(ds[stim_dim].values).dtype.kind in "UOST":
                container.setdefault(key_column, np.asarray(ds[stim_dim].values))
        if target_dim in ds.coords and not any(n in container and ds[n].dims == (target_dim,)
                                               for n in _TARGET_NAMES if n != target_dim):
            container.setdefault("targets", np.asarray(ds[target_dim].values))
        values = np.asarray(da.transpose(stim_dim, target_dim).values)
    return values, container


def _resolve_per_target(spec: Any, container: dict, defaults: Sequence[str], what: str,
                        opts: dict) -> list[str] | None:
    if spec is None:
        found = _pick(container, None, defaults)
        return None if found is None else [str(x) for x in np.asarray(found).reshape(-1).tolist()]
    if isinstance(spec, str) and spec in container:
        return [str(x) for x in np.asarray(container[spec]).reshape(-1).tolist()]
    if _is_pathlike(spec):
        return _read_lines(spec, opts)
    return [str(x) for x in spec]


def _resolve_ceiling(spec: Any, container: dict, opts: dict) -> np.ndarray | None:
    if spec is None:
        found = _pick(container, None, _CEILING_NAMES)
        return None if found is None else np.asarray(found, dtype=np.float64).reshape(-1)
    if isinstance(spec, str) and spec in container:
        return np.asarray(container[spec], dtype=np.float64).reshape(-1)
    if _is_pathlike(spec):
        s = os.fspath(spec)
        if s.endswith(".npy"):
            with _open(s, "rb", opts) as f:
                return np.load(f, allow_pickle=False).astype(np.float64).reshape(-1)
        try:
            return np.asarray([float(x) for x in _read_lines(s, opts)])
        except ValueError as e:
            raise EncodingError(f"noise ceiling file {s!r}: every line must be a number ({e})") from e
    return np.asarray(spec, dtype=np.float64).reshape(-1)


def _resolve_split(split: Any, container: dict, keys: list[str], opts: dict, spath: str) -> np.ndarray | None:
    if split is None:
        return None
    n = len(keys)
    if isinstance(split, str) and split in container:
        return _split_values(container[split], split, n, spath)
    if _is_pathlike(split):
        s = os.fspath(split)
        if not _exists(s, opts):
            raise EncodingError(f"split {s!r} is neither a column/array/variable of {spath} (it has "
                                f"{_fmt(sorted(container), 12)}) nor a file listing test keys")
        return _test_keys_to_train(_read_lines(s, opts), keys, s)
    arr = np.asarray(split)
    if arr.dtype == bool or (arr.size == n and np.issubdtype(arr.dtype, np.number)):
        return _split_values(arr, "train", n, spath)
    if arr.size == n and {str(x).strip().lower() for x in arr.tolist()} <= {"train", "test"}:
        return _split_values(arr, "split", n, spath)
    return _test_keys_to_train([str(x) for x in arr.reshape(-1).tolist()], keys, "the test key list")


def _split_values(values: np.ndarray, name: str, n: int, spath: str) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if values.size != n:
        raise EncodingError(f"{spath}: split {name!r} has {values.size} entries for {n} rows")
    if values.dtype.kind in "UOST":
        low = np.array([str(v).strip().lower() for v in values.tolist()])
        unknown = sorted(set(low.tolist()) - {"train", "test"})
        if unknown:
            raise EncodingError(f"{spath}: split {name!r} must hold 'train'/'test' (or booleans); found {_fmt(unknown)}")
        return low == "train"
    flag = _as_bool(values, f"split {name!r}")
    # A column called `test`/`is_test` marks test stimuli; anything else (`train`, `is_train`) training ones.
    return ~flag if "test" in name.lower() else flag


def _test_keys_to_train(test_keys: list[str], keys: list[str], where: str) -> np.ndarray:
    test = set(test_keys)
    unknown = sorted(test - set(keys))
    if unknown and len(unknown) == len(test):
        raise EncodingError(f"none of the {len(test)} test keys from {where} is a key of the neural data "
                            f"(e.g. {_fmt(unknown)} vs {_fmt(keys)})")
    if unknown:
        warnings.warn(f"{len(unknown)} test keys from {where} are not in the neural data and are ignored "
                      f"(e.g. {_fmt(unknown)})", AlignmentWarning, stacklevel=3)
    return np.array([k not in test for k in keys], dtype=bool)


# ---------------------------------------------------------------------------------------------
# One layer


def encode_layer(X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray, Y_test: np.ndarray,
                 alphas: Sequence[float] | np.ndarray | None = None, n_folds: int = 5, *, cv: Any = None,
                 seed: int = 0, device: str = "auto", dtype: str = "float32", solver: str = "auto",
                 batch_bytes: int = _DEFAULT_BATCH_BYTES, return_predictions: bool = False) -> dict[str, Any]:
    """Fit ridge on one layer's training stimuli and score it on the test stimuli, for all targets.

    X_*: (n, ...) features (flattened here); Y_*: (n, n_targets) responses. Features are
    standardised with the training rows' mean and std (constant features become 0); targets are
    z-scored with the training rows' statistics too, which changes neither the chosen alphas nor
    r / R^2 but keeps float32 well-conditioned. An intercept is fitted in every fold.

    alphas: ridge grid (default DEFAULT_ALPHAS); one alpha is chosen per target by `n_folds`-fold
        cross-validation on the training rows only (shuffled with `seed`), minimising the squared
        error. cv: a scikit-learn splitter to use instead (e.g. LeaveOneOut()).
    solver: "ridge" (himalaya RidgeCV, primal), "kernel" (himalaya KernelRidgeCV, linear kernel) or
        "auto": whichever needs fewer operations for this shape (see `_solver_flops`). Both give
        the same fit; kernel wins when features outnumber stimuli, and also somewhat below that,
        because himalaya's primal solver builds a features x stimuli matrix per alpha.
    device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N" or "numpy".
    dtype: "float32" (fast, enough for these scores) or "float64".
    batch_bytes: cap on the size of the solver's largest intermediates (alphas and targets are
        processed in batches to stay under it).

    Returns numpy arrays: r, r2, alpha, cv_score (per target), and n_train, n_test, n_features,
    solver, backend, seconds; predictions (n_test, n_targets, in Y's units) if return_predictions.
    """
    t0 = time.perf_counter()
    alphas = _check_alphas(alphas)
    Xtr, Xte = _as_2d(X_train, "X_train"), _as_2d(X_test, "X_test")
    Ytr, Yte = _as_targets(Y_train, "Y_train"), _as_targets(Y_test, "Y_test")
    if Xtr.shape[0] != Ytr.shape[0] or Xte.shape[0] != Yte.shape[0]:
        raise EncodingError(f"rows differ: X_train {Xtr.shape[0]} vs Y_train {Ytr.shape[0]}, "
                            f"X_test {Xte.shape[0]} vs Y_test {Yte.shape[0]}")
    if Xtr.shape[1] != Xte.shape[1] or Ytr.shape[1] != Yte.shape[1]:
        raise EncodingError(f"train and test differ in width: features {Xtr.shape[1]} vs {Xte.shape[1]}, "
                            f"targets {Ytr.shape[1]} vs {Yte.shape[1]}")
    n_train, n_features = Xtr.shape
    n_targets = Ytr.shape[1]
    for name, a in (("X_train", Xtr), ("X_test", Xte), ("Y_train", Ytr), ("Y_test", Yte)):
        if not np.isfinite(a).all():
            raise EncodingError(f"{name} holds NaN or inf; drop those stimuli first (encode() does this)")
    if cv is None:
        if n_train < max(_MIN_TRAIN, 2 * n_folds):
            raise EncodingError(f"{n_train} training stimuli are too few for {n_folds}-fold alpha selection; "
                                f"need at least {max(_MIN_TRAIN, 2 * n_folds)}")
        from sklearn.model_selection import KFold

        # Shuffled: stimuli often come sorted by category, and unshuffled folds would then
        # hold out whole categories.
        cv = KFold(n_splits=int(n_folds), shuffle=True, random_state=int(seed))
    # Materialised: himalaya asks the splitter for get_n_splits() without X, which LeaveOneOut
    # and other sample-count-dependent splitters cannot answer.
    try:
        splits = [(np.asarray(a), np.asarray(b)) for a, b in cv.split(np.zeros((Xtr.shape[0], 1)))]
    except Exception as e:
        raise EncodingError(f"inner cross-validation splitter {cv!r} failed on {Xtr.shape[0]} stimuli: {e}") from e
    if not splits or any(len(a) == 0 or len(b) == 0 for a, b in splits):
        raise EncodingError(f"inner cross-validation {cv!r} gives an empty fold for {Xtr.shape[0]} stimuli")
    if dtype not in ("float32", "float64"):
        raise EncodingError(f"dtype must be 'float32' or 'float64', not {dtype!r}")
    np_dtype = np.dtype(dtype)

    # Standardise with training statistics only: test rows must not inform the model.
    mu, sd = _column_stats(Xtr)
    Xtr, Xte = _standardise(Xtr, mu, sd, np_dtype), _standardise(Xte, mu, sd, np_dtype)
    ymu, ysd = Ytr.mean(0), Ytr.std(0)
    ysd[ysd == 0] = 1.0
    Ytr_z = ((Ytr - ymu) / ysd).astype(np_dtype)

    n_inner_train, n_inner_test = max(len(a) for a, _ in splits), max(len(b) for _, b in splits)
    if solver == "auto":
        costs = {name: _solver_flops(name, n_train, n_features, n_targets, len(alphas), n_inner_train,
                                     n_inner_test, len(splits)) for name in ("ridge", "kernel")}
        solver = min(costs, key=costs.__getitem__)
    if solver not in ("ridge", "kernel"):
        raise EncodingError(f"solver must be 'auto', 'ridge' or 'kernel', not {solver!r}")
    width = n_features if solver == "ridge" else n_train
    solver_params = _solver_batches(width, n_inner_train, n_inner_test, n_train, n_targets, len(alphas),
                                    np_dtype.itemsize, batch_bytes)

    with _himalaya_backend(device) as backend:
        with warnings.catch_warnings():
            # himalaya suggests the other solver by shape alone; we chose by estimated cost
            warnings.filterwarnings("ignore", message=r"Solving (linear kernel )?ridge is slower", category=UserWarning)
            if solver == "ridge":
                from himalaya.ridge import RidgeCV

                model = RidgeCV(alphas=alphas.astype(np_dtype), fit_intercept=True, cv=splits,
                                solver_params=solver_params)
            else:
                from himalaya.kernel_ridge import KernelRidgeCV

                model = KernelRidgeCV(alphas=alphas.astype(np_dtype), kernel="linear", fit_intercept=True, cv=splits,
                                      solver_params=solver_params, warn=False)
            model.fit(Xtr, Ytr_z)
            pred_z = backend.to_numpy(model.predict(Xte)).astype(np.float64)
        best = backend.to_numpy(model.best_alphas_).astype(np.float64)
        cv_score = backend.to_numpy(model.cv_scores_).astype(np.float64).reshape(-1)
        backend_name = backend.name
        del model

    pred = pred_z * ysd + ymu
    # the grid values themselves, not float32 round-trips of them (1e6 must read as 1e6)
    best = alphas[np.abs(np.log(best[:, None]) - np.log(alphas[None, :])).argmin(1)]
    out: dict[str, Any] = {
        "r": pearson_r(Yte, pred),
        "r2": r2_score(Yte, pred),
        "alpha": best,
        "cv_score": cv_score,
        "n_train": int(n_train),
        "n_test": int(Xte.shape[0]),
        "n_features": int(n_features),
        "solver": solver,
        "backend": backend_name,
        "seconds": time.perf_counter() - t0,
    }
    if return_predictions:
        out["predictions"] = pred
    return out


def _column_stats(X: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std (float64), a block of columns at a time: a float64 copy of a whole
    wide layer (10,000 stimuli x 100,000 features = 8 GB) is never made. Zero std becomes 1."""
    mu = np.empty(X.shape[1])
    sd = np.empty(X.shape[1])
    for j in range(0, X.shape[1], block):
        part = X[:, j:j + block].astype(np.float64)
        mu[j:j + block] = part.mean(0)
        sd[j:j + block] = part.std(0)
    sd[sd == 0] = 1.0  # a constant feature carries nothing; centred it is 0 everywhere
    return mu, sd


def _standardise(X: np.ndarray, mu: np.ndarray, sd: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = X.astype(dtype, copy=True)  # one copy in the solver's dtype, then in place
    out -= mu.astype(dtype)
    out /= sd.astype(dtype)
    return out


def pearson_r(y: np.ndarray, y_hat: np.ndarray) -> np.ndarray:
    """Per-column Pearson correlation; NaN where either column is constant."""
    y = np.asarray(y, dtype=np.float64)
    y_hat = np.asarray(y_hat, dtype=np.float64)
    yc, pc = y - y.mean(0), y_hat - y_hat.mean(0)
    den = np.sqrt((yc**2).sum(0) * (pc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc * pc).sum(0) / den
    r[~(den > 0)] = np.nan
    return r


def r2_score(y: np.ndarray, y_hat: np.ndarray) -> np.ndarray:
    """Per-column coefficient of determination on held-out data (1 - SSres/SStot around the
    held-out mean, as scikit-learn defines it); can be negative; NaN for a constant column."""
    y = np.asarray(y, dtype=np.float64)
    ss_res = ((y - y_hat) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    r2[~(ss_tot > 0)] = np.nan
    return r2


_BACKEND_LOCK = threading.RLock()


@contextlib.contextmanager
def _himalaya_backend(device: str) -> Iterator[Any]:
    """Select himalaya's backend for the device, and restore the previous one afterwards.

    himalaya keeps its backend in a module-global: two threads fitting with different backends
    would switch it under each other's feet, so fits in one process are serialised by a lock.
    (Run layers in parallel as separate processes, as a flow's workers do.)
    """
    from himalaya.backend import get_backend, set_backend

    name, cuda_index = _backend_for(device)
    # Explicit devices fail loudly; "auto"/"cpu" fall back (CUDA -> torch CPU -> numpy, which
    # always works) so that a broken driver or torch build never stops an analysis.
    fallbacks = {"torch_cuda": ["torch", "numpy"], "torch": ["numpy"]}.get(name, []) \
        if str(device).strip().lower() in ("auto", "cpu") else []
    with _BACKEND_LOCK:
        previous = get_backend()
        backend = None
        for i, candidate in enumerate([name, *fallbacks]):
            try:
                backend = set_backend(candidate)
                break
            except Exception as e:
                if i == len(fallbacks):
                    raise EncodingError(f"cannot use device {device!r} (himalaya backend {candidate!r}): {e}") from e
                log.warning("himalaya backend %r unavailable (%s); trying %r", candidate, e, fallbacks[i])
        try:
            if cuda_index is not None:
                import torch

                with torch.cuda.device(cuda_index):
                    yield backend
            else:
                yield backend
        finally:
            set_backend(previous)


def _backend_for(device: str) -> tuple[str, int | None]:
    device = str(device).strip().lower()
    if device == "numpy":
        return "numpy", None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the project
        if device in ("auto", "cpu"):
            return "numpy", None
        raise EncodingError(f"device {device!r} needs torch, which is not installed") from None
    if device == "auto":
        return ("torch_cuda" if torch.cuda.is_available() else "torch"), None
    if device == "cpu":
        return "torch", None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EncodingError(f"device {device!r} asked for, but CUDA is not available here; use "
                                "device='auto' or 'cpu'")
        _, _, idx = device.partition(":")
        return "torch_cuda", (int(idx) if idx.strip() else None)
    raise EncodingError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or numpy")


def _solver_flops(solver: str, n: int, p: int, t: int, a: int, m: int, e: int, k: int) -> float:
    """Rough multiply-add count of himalaya's RidgeCV ("ridge") or linear KernelRidgeCV ("kernel").

    n training stimuli, p features, t targets, a alphas, k inner folds of m training and e
    validation stimuli. Per fold, primal: SVD of (m, p), one (p, m) solution matrix per alpha, its
    product with the validation features, predictions; kernel: eigh of (m, m), one (e, m) matrix
    per alpha, predictions. Refit on all n (all alphas assumed used): primal (p, n) matrices and
    (p, t) weights per alpha; kernel (n, n) matrices and (n, t) dual weights per alpha.
    """
    if solver == "ridge":
        r = min(m, p)
        fold = 4 * m * p * r + a * p * r * m + a * e * p * m + a * e * m * t
        refit = 4 * n * p * min(n, p) + a * p * min(n, p) * n + a * p * n * t
        return float(k * fold + refit)
    fold = 4 * m**3 + e * m * m + a * e * m * m + a * e * m * t
    refit = n * n * p + 4 * n**3 + a * n**3 + a * n * n * t
    return float(k * fold + refit)


def _solver_batches(width: int, n_in_train: int, n_in_test: int, n_train: int, n_targets: int,
                    n_alphas: int, itemsize: int, batch_bytes: int) -> dict[str, int]:
    """Batch sizes that keep himalaya's intermediates near batch_bytes each.

    Per inner fold it builds (alphas, width, n_in_train) solution matrices and
    (alphas, n_in_test, targets) predictions; the refit builds (alphas, width, targets) weights,
    where width is n_features (primal) or n_train (kernel). Unbatched, 17 alphas x 4096 features x
    8000 stimuli would be 2.2 GB at once, and predictions for 10,000 targets more again.
    """
    per_alpha = itemsize * max(width, n_in_test) * max(n_in_train, n_train)
    n_alphas_batch = int(max(1, min(n_alphas, batch_bytes // max(1, per_alpha))))
    per_target = itemsize * n_alphas_batch * max(n_in_test, width)
    n_targets_batch = int(max(1, min(n_targets, batch_bytes // max(1, per_target))))
    return {"n_alphas_batch": n_alphas_batch, "n_targets_batch": n_targets_batch,
            "n_targets_batch_refit": n_targets_batch}


# ---------------------------------------------------------------------------------------------
# A whole run


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


def _open_features(features: Any, storage_options: Mapping | None) -> tuple[Any, list[str], str]:
    """The Dataset, its layers in model order, and a printable name."""
    import xarray as xr

    if isinstance(features, xr.Dataset):
        ds = features
        order = [str(v) for v in ds.data_vars if v != "valid"]
        return ds, order, str(ds.attrs.get("store", "<dataset>"))
    from neuropredictor.store import FeatureStore, open_features

    url = os.fspath(features)
    ds = open_features(url, dict(storage_options) if storage_options else None)
    # xarray lists a group's arrays alphabetically; the manifest keeps the model's order.
    manifest_order = [lay.name for lay in FeatureStore.open(url, dict(storage_options or {}), mode="r").layers]
    order = [n for n in manifest_order if n in ds.data_vars] + \
        [str(v) for v in ds.data_vars if v != "valid" and v not in manifest_order]
    return ds, order, str(ds.attrs.get("store", url))


def _select_layers(layers: Any, order: list[str]) -> list[str]:
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


def _align(ds: Any, neural: NeuralData) -> dict[str, Any]:
    """Match neural rows to feature rows by key; report and drop what cannot be used."""
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
            f"data ({len(npos)} keys, e.g. {_fmt(neural.keys)})." + _key_hint(list(fpos), neural.keys)
            + " Keys must equal the corpus keys (`neuropredictor shards` names samples by their relative path "
            "without extension).")

    values = neural.values
    all_nan_targets = np.isnan(values).all(0)
    if all_nan_targets.all():
        raise EncodingError("every target of the neural data is NaN for every stimulus")
    usable = np.flatnonzero(~all_nan_targets)
    fi = np.array([fpos[k] for k in common], dtype=np.int64)
    ni = np.array([npos[k] for k in common], dtype=np.int64)
    ok_valid = valid[fi]
    ok_nan = ~np.isnan(values[np.ix_(ni, usable)]).any(1)
    invalid = [common[i] for i in np.flatnonzero(~ok_valid)]
    nan_rows = [common[i] for i in np.flatnonzero(ok_valid & ~ok_nan)]
    keep = ok_valid & ok_nan
    fi, ni = fi[keep], ni[keep]

    def entry(keys: list[str], why: str) -> dict[str, Any]:
        return {"count": len(keys), "examples": keys[:_EXAMPLES], "why": why}

    dropped = {
        "features_only": entry(features_only, "stimulus in the features store but not in the neural data"),
        "neural_only": entry(neural_only, "stimulus in the neural data but not in the features store"),
        "invalid_features": entry(invalid, "features row not valid (undecodable image or uncommitted shard)"),
        "nan_neural": entry(nan_rows, "neural row has NaN in a target that is not NaN everywhere"),
        "nan_targets": entry([neural.targets[i] for i in np.flatnonzero(all_nan_targets)],  # type: ignore[index]
                             "target NaN for every stimulus (scores stay NaN)"),
    }
    report = {"n_features_rows": len(fpos), "n_neural_rows": neural.n_stimuli, "n_matched": int(len(fi)),
              "dropped": dropped}
    lines = [f"{v['count']} {k.replace('_', ' ')} (e.g. {_fmt(v['examples'])})" for k, v in dropped.items() if v["count"]]
    if lines:
        msg = f"matched {len(fi)} stimuli; dropped: " + "; ".join(lines)
        log.warning(msg)
        warnings.warn(msg, AlignmentWarning, stacklevel=3)
    if len(fi) == 0:
        raise EncodingError(f"no usable stimulus left after alignment: {len(invalid)} matched rows are invalid in "
                            f"the features store and {len(nan_rows)} have NaN in the neural data")
    return {"features_rows": fi, "neural_rows": ni, "targets": usable, "report": report}


def _key_hint(fkeys: list[str], nkeys: list[str]) -> str:
    """Say so when the keys would match after stripping folders / extensions."""
    def norm(k: str) -> str:
        base = k.replace("\\", "/").rsplit("/", 1)[-1]
        return base.rsplit(".", 1)[0] if "." in base else base

    fn = {norm(k) for k in fkeys}
    hits = sum(norm(k) in fn for k in nkeys)
    if hits:
        return (f" {hits} neural keys would match after dropping folders and file extensions: write the keys "
                "exactly as stored (e.g. 'cat0/img0001', no extension).")
    return ""


def _outer_splits(keys: list[str], train: np.ndarray | None, test_fraction: float, outer_folds: int | None,
                  seed: int) -> dict[str, Any]:
    n = len(keys)
    if train is not None:
        if outer_folds:
            raise EncodingError("the neural data has its own train/test split; drop it or outer_folds, not both")
        tr, te = np.flatnonzero(train), np.flatnonzero(~train)
        return {"splits": [(tr, te)], "how": "given", "n_train": len(tr), "n_test": len(te)}
    # Random, but a function of the seed and the key set only: rows in another order split the same.
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    perm = order[np.random.default_rng(seed).permutation(n)]
    if outer_folds:
        k = int(outer_folds)
        if k < 2 or k > n:
            raise EncodingError(f"outer_folds must be between 2 and the number of stimuli ({n}), not {k}")
        parts = np.array_split(perm, k)
        splits = [(np.sort(np.concatenate([p for j, p in enumerate(parts) if j != i])), np.sort(parts[i]))
                  for i in range(k)]
        return {"splits": splits, "how": f"{k}-fold", "n_train": n - len(parts[0]), "n_test": len(parts[0])}
    n_test = int(round(n * float(test_fraction)))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return {"splits": [(tr, te)], "how": f"random {test_fraction:g} (seed {seed})", "n_train": len(tr),
            "n_test": len(te)}


def _layer_matrix(ds: Any, layer: str, rows: np.ndarray, keys: list[str]) -> np.ndarray:
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
                            "float16 stores can overflow: re-extract with dtype float32, or leave the layer out")
    return X


# ---------------------------------------------------------------------------------------------
# Summaries, saving, plotting


def summary_table(ds: xarray.Dataset, metric: str = "r") -> pandas.DataFrame:
    """Per-layer summary of a score Dataset, tidy: one row per (roi, layer).

    roi is "all" for every target together, then each ROI (if the scores have `roi`). Columns:
    roi, layer, n_targets (with a finite score), median, q25, q75, mean (of `metric`, default r),
    median_r2, best (True for the layer with the highest median within that roi). The best layer
    per ROI is therefore `df[df.best]`.
    """
    import pandas as pd

    if metric not in ds:
        raise EncodingError(f"no variable {metric!r} in the scores; have {', '.join(map(str, ds.data_vars))}")
    groups: list[tuple[str, np.ndarray]] = [("all", np.ones(ds.sizes["target"], bool))]
    if "roi" in ds.coords:
        rois = np.asarray(ds["roi"].values).astype(str)
        groups += [(roi, rois == roi) for roi in dict.fromkeys(rois.tolist())]
    rows = []
    values = np.asarray(ds[metric].values, dtype=np.float64)
    r2 = np.asarray(ds["r2"].values, dtype=np.float64) if "r2" in ds else None
    layers = [str(x) for x in ds["layer"].values]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups give NaN, which is the answer
        for roi, mask in groups:
            group_rows = []
            for li, layer in enumerate(layers):
                v = values[li, mask]
                fin = v[np.isfinite(v)]
                group_rows.append({
                    "roi": roi, "layer": layer, "n_targets": int(fin.size),
                    "median": float(np.median(fin)) if fin.size else np.nan,
                    "q25": float(np.percentile(fin, 25)) if fin.size else np.nan,
                    "q75": float(np.percentile(fin, 75)) if fin.size else np.nan,
                    "mean": float(fin.mean()) if fin.size else np.nan,
                    "median_r2": float(np.nanmedian(r2[li, mask])) if r2 is not None else np.nan,
                })
            meds = np.array([g["median"] for g in group_rows])
            best = int(np.nanargmax(meds)) if np.isfinite(meds).any() else -1
            for i, g in enumerate(group_rows):
                g["best"] = i == best
            rows += group_rows
    df = pd.DataFrame(rows, columns=["roi", "layer", "n_targets", "median", "q25", "q75", "mean", "median_r2", "best"])
    df.attrs["metric"] = metric
    return df


def save_scores(ds: xarray.Dataset, url: str, storage_options: Mapping | None = None,
                overwrite: bool = False) -> str:
    """Write the scores as a Zarr v3 store at url (local path or any fsspec URL); returns url.

    An existing store at url is replaced only with overwrite=True, and never when it is a
    features store (it holds a manifest.json): scores are written next to runs, not over them.
    """
    import fsspec

    from neuropredictor.manifest import redact_text

    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except (ImportError, ValueError, TypeError) as e:
        raise EncodingError(f"cannot open {redact_text(url)!r}: {e}") from e
    root = root.rstrip("/")
    if fs.exists(root):
        if fs.exists(f"{root}/manifest.json"):
            raise EncodingError(f"{redact_text(url)!r} is a features store; write the scores elsewhere "
                                "(e.g. next to it, as RUN-scores.zarr)")
        if not overwrite:
            raise EncodingError(f"{redact_text(url)!r} already exists; pass overwrite=True (CLI --overwrite) "
                                "or choose another path")
    # Fixed-width numpy strings ('<U5') have no zarr v3 data type yet (zarr warns they may become
    # unreadable); object strings are stored as the specified variable-length UTF-8.
    ds = ds.copy()
    for name, var in list(ds.variables.items()):
        if var.dtype.kind == "U":
            ds[name] = var.astype(object)
    with warnings.catch_warnings():
        # consolidated metadata is not in the zarr v3 spec yet; xarray reads it fastest and zarr warns
        warnings.filterwarnings("ignore", message=r"Consolidated metadata is currently not part")
        ds.to_zarr(url, mode="w", zarr_format=3, consolidated=True,
                   storage_options=dict(storage_options) if storage_options else None)
    return url


def plot_scores(ds: xarray.Dataset, path: str | os.PathLike, metric: str = "r",
                storage_options: Mapping | None = None) -> str:
    """PNG of layer-wise scores: median `metric` per layer (layers in model order) with its IQR
    band over targets, plus one line per ROI when the scores have ROIs. Returns the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise EncodingError("plotting needs matplotlib: pip install matplotlib") from e

    table = summary_table(ds, metric)
    layers = [str(x) for x in ds["layer"].values]
    x = np.arange(len(layers))
    # Figure + Agg canvas directly, not pyplot: no global backend switch in the caller's session.
    fig = Figure(figsize=(max(5.0, 0.6 * len(layers) + 2.5), 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    allr = table[table.roi == "all"]
    ax.fill_between(x, allr["q25"].to_numpy(), allr["q75"].to_numpy(), color="0.6", alpha=0.35,
                    label="all targets, IQR")
    ax.plot(x, allr["median"].to_numpy(), color="k", marker="o", lw=2, label=f"all targets, median ({len(ds.target)})")
    rois = [r for r in dict.fromkeys(table.roi.tolist()) if r != "all"]
    for i, roi in enumerate(rois):
        sub = table[table.roi == roi]
        ax.plot(x, sub["median"].to_numpy(), marker=".", lw=1.2, color=f"C{i % 10}",
                label=f"{roi} ({int(sub['n_targets'].max())})")
    ax.axhline(0.0, color="0.3", lw=0.6, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=45 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center")
    ax.set_xlabel("layer")
    ax.set_ylabel({"r": "held-out Pearson r", "r2": "held-out R²", "r_normalized": "r / noise ceiling"}.get(metric, metric))
    name = str(ds.attrs.get("features", ""))
    name = "" if name.startswith("<") else name.rstrip("/").rsplit("/", 1)[-1]
    split = f"train {ds.attrs['n_train']}, test {ds.attrs['n_test']}" if "n_train" in ds.attrs else ""
    ax.set_title("  ".join(x for x in (f"encoding scores {name}".strip(), split) if x), fontsize=9)
    ax.legend(fontsize=7, loc="best", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    spath = os.fspath(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with _open(spath, "wb", dict(storage_options or {})) as f:
        f.write(buf.getvalue())
    return spath


# ---------------------------------------------------------------------------------------------
# RSA


def rdm(patterns: np.ndarray) -> np.ndarray:
    """Representational dissimilarity matrix: 1 - Pearson r between the rows (stimuli) of
    patterns (n, ...) -> (n, n). A constant row has NaN dissimilarities."""
    X = np.asarray(patterns, dtype=np.float64).reshape(len(patterns), -1)
    X = X - X.mean(1, keepdims=True)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        X = X / norm
    X[~(norm[:, 0] > 0)] = np.nan
    d = 1.0 - X @ X.T
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

    ds, order, features_name = _open_features(features, storage_options)
    layers = _select_layers(layers, order)
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
    aligned = _align(ds, neural_data)
    fi, ni, usable = aligned["features_rows"], aligned["neural_rows"], aligned["targets"]
    if len(fi) < 3:
        raise EncodingError(f"RSA needs at least 3 matched stimuli; have {len(fi)}")
    keys = [neural_data.keys[i] for i in ni]
    iu = np.triu_indices(len(fi), k=1)

    def ranked(d: np.ndarray) -> np.ndarray:
        return rankdata(d[iu])

    targets: dict[str, np.ndarray] = {}
    if neural_rdm is not None:
        targets["all"] = ranked(np.asarray(neural_rdm, dtype=np.float64)[np.ix_(ni, ni)])
    else:
        Y = neural_data.values[np.ix_(ni, usable)]
        targets["all"] = ranked(rdm(Y))
        if by_roi and neural_data.roi is not None:
            rois = np.asarray(neural_data.roi)[usable]
            for roi in dict.fromkeys(rois.tolist()):
                targets[str(roi)] = ranked(rdm(Y[:, rois == roi]))
    rho = np.full((len(layers), len(targets)), np.nan)
    for li, layer in enumerate(layers):
        lr = ranked(rdm(_layer_matrix(ds, layer, fi, keys)))
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


# ---------------------------------------------------------------------------------------------
# CLI-facing


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


def save_outputs(scores: xarray.Dataset, out: str, plot: str | None = None, overwrite: bool = False,
                 storage_options: Mapping | None = None) -> dict[str, Any]:
    """save_scores(out) -> plot_scores(plot, default OUT + ".png") -> the JSON-able summary that
    `encode_command` returns (also used by the `encode` flow after its per-layer tasks)."""
    save_scores(scores, out, storage_options=storage_options, overwrite=overwrite)
    png = plot or out.rstrip("/") + ".png"
    plot_scores(scores, png, storage_options=storage_options)
    table = summary_table(scores)
    allr = table[table.roi == "all"]
    best = table[table.best]
    return {
        "scores": out,
        "plot": png,
        "layers": {row.layer: (None if math.isnan(row.median) else round(float(row.median), 4))
                   for row in allr.itertuples()},
        "best_layer": next((row.layer for row in best.itertuples() if row.roi == "all"), None),
        "best_layer_per_roi": {row.roi: row.layer for row in best.itertuples() if row.roi != "all"},
        "n_train": int(scores.attrs["n_train"]),
        "n_test": int(scores.attrs["n_test"]),
        "dropped": {k[len("dropped_"):]: int(v) for k, v in scores.attrs.items() if k.startswith("dropped_")},
    }


def parse_alphas(spec: str | Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Alpha grid from "1,10,100", "logspace:-2:6:17" (10^-2 .. 10^6, 17 values), a list, or None
    (DEFAULT_ALPHAS)."""
    if spec is None:
        return DEFAULT_ALPHAS.copy()
    if isinstance(spec, str):
        s = spec.strip()
        try:
            if s.lower().startswith("logspace:"):
                lo, hi, num = s.split(":")[1:]
                return np.logspace(float(lo), float(hi), int(num))
            return _check_alphas([float(x) for x in s.split(",") if x.strip()])
        except ValueError as e:
            raise EncodingError(f"cannot read alphas {spec!r}: use '1,10,100' or 'logspace:-2:6:17' ({e})") from e
    return _check_alphas(spec)


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_alphas(alphas: Any) -> np.ndarray:
    if alphas is None:
        return DEFAULT_ALPHAS.copy()
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.isfinite(a).all() or (a <= 0).any():
        raise EncodingError(f"alphas must be positive finite numbers; got {a.tolist()[:8]}")
    # himalaya looks chosen alphas up by binary search: the grid must be sorted and unique
    return np.unique(a)


def _as_2d(X: Any, name: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim < 2:
        raise EncodingError(f"{name} must be (n_stimuli, n_features...); got shape {X.shape}")
    X = X.reshape(X.shape[0], -1)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    return X


def _as_targets(Y: Any, name: str) -> np.ndarray:
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise EncodingError(f"{name} must be (n_stimuli, n_targets); got shape {Y.shape}")
    return Y


def _as_bool(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    if arr.dtype == bool:
        return arr.copy()
    if np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise EncodingError(f"{what} must be booleans (or 0/1, or 'train'/'test'); got values like {_fmt(arr.tolist())}")


def _duplicates(items: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dup: dict[str, None] = {}
    for x in items:
        if x in seen:
            dup[x] = None
        seen.add(x)
    return list(dup)


def _fmt(items: Sequence[Any], n: int = _EXAMPLES) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _suffix(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _open(path: str, mode: str, opts: Mapping | None) -> Any:
    import fsspec

    try:
        return fsspec.open(path, mode, **dict(opts or {})).open()
    except FileNotFoundError as e:
        raise EncodingError(f"file not found: {path}") from e


def _exists(path: str, opts: Mapping | None) -> bool:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path, **dict(opts or {}))
        return bool(fs.exists(root))
    except Exception:
        return False


def _read_lines(spec: Any, opts: Mapping | None) -> list[str]:
    """Non-empty lines of a text file, stripped (a trailing newline or blank lines add no key)."""
    with _open(os.fspath(spec), "r", opts) as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def _pick(container: Mapping[str, Any], name: str | None, defaults: Sequence[str]) -> Any:
    if name is not None and name in container:
        return container[name]
    for d in defaults:
        if d in container:
            return container[d]
    return None
