"""Neural data: `NeuralData` (stimuli x targets with keys, ROIs, split, ceiling) and `load_neural`,
which reads it from .npy, .npz, .csv, .nc or .zarr."""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuropredictor import fs as fsx
from neuropredictor.redact import redact_text
from neuropredictor.encode._common import ALL_TARGETS, AlignmentWarning, EncodingError, _duplicates, _fmt, _open

NEURAL_FORMATS = (".npy", ".npz", ".csv", ".nc", ".zarr")

# Names looked for inside containers (.npz arrays, .nc/.zarr variables) when not given explicitly.
_KEY_NAMES = ("key", "keys", "stimulus", "stimuli", "stimulus_id", "image", "images")
_TARGET_NAMES = ("target", "targets", "target_names", "voxel", "voxels", "neuroid", "neuroids")
_ROI_NAMES = ("roi", "rois", "region")
_CEILING_NAMES = ("ceiling", "noise_ceiling", "ceilings")
_DATA_NAMES = ("data", "values", "responses", "Y", "y", "betas")
_SPLIT_NAMES = ("split", "is_test", "test", "is_train", "train", "shared")  # only named to the user: see load_neural
_ID_COLUMN = re.compile(r"(?:.*[_\s])?(?:id|idx|index)", re.IGNORECASE)  # nsd_id, image_index: not responses


@dataclass
class NeuralData:
    """Neural responses for a set of stimuli.

    values: (n_stimuli, n_targets) float64; NaN marks a missing measurement.
    keys: the stimulus keys, one per row, matching the corpus keys of the features store.
    targets: a name per target (voxel id, neuron id); default "t0", "t1", ...
    roi: a label per target (for per-ROI summaries), or None.
    train: bool per row, True = training stimulus, or None (encode then splits by itself).
    groups: a label per row (the concept of an image, the photo a crop came from), or None: stimuli of
        one group are never on both sides of a split.
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
    groups: list[str] | None = None

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
        # bytes (from h5py, MATLAB) as text: str(b"img1") is "b'img1'", which matches no image
        self.keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in self.keys]
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
            if ALL_TARGETS in self.roi:
                raise EncodingError(f"an ROI is labelled {ALL_TARGETS!r}, the name of the group of every target that "
                                    "scores are summarised over first: rename that ROI")
        if self.train is not None:
            self.train = _as_bool(self.train, "train mask")
            if self.train.shape != (n,):
                raise EncodingError(f"train mask has shape {self.train.shape}; expected ({n},), one flag per row")
        if self.groups is not None:
            self.groups = [str(g) for g in np.asarray(self.groups, dtype=object).reshape(-1).tolist()]
            if len(self.groups) != n:
                raise EncodingError(f"{len(self.groups)} group labels for {n} rows of neural data: give one "
                                    "label per row, in row order")
        if self.ceiling is not None:
            self.ceiling = np.asarray(self.ceiling, dtype=np.float64).reshape(-1)
            if self.ceiling.shape != (t,):
                raise EncodingError(f"{self.ceiling.size} noise-ceiling values for {t} targets: give one per target")
            unusable = [self.targets[i] for i in np.flatnonzero(~(self.ceiling > 0))]
            if unusable:
                warnings.warn(f"{len(unusable)} targets have a noise ceiling that is not positive (or NaN): their "
                              f"r_normalized is NaN ({_fmt(unusable)})", AlignmentWarning, stacklevel=3)
            above = np.flatnonzero(self.ceiling > 1)
            if len(above):
                warnings.warn(f"{len(above)} targets have a noise ceiling above 1 (up to {np.nanmax(self.ceiling):.3g}), "
                              "which r cannot reach: the ceiling is in units of r (0 to 1). Convert one in percent "
                              "(NSD's ncsnr-based ceilings) or in R² (take its square root) first",
                              AlignmentWarning, stacklevel=3)

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
                          self.ceiling, source=f"{self.source} (keys permuted, seed {seed})", groups=self.groups)


def load_neural(path: str | os.PathLike, keys: str | os.PathLike | Sequence[str] | None = None,
                key_column: str = "key", split: Any = None, *, targets: Any = None, roi: Any = None,
                ceiling: Any = None, array: str | None = None, groups: Any = None,
                storage_options: Mapping | None = None) -> NeuralData:
    """Read neural data (stimuli x targets) and its stimulus keys.

    path: `.npy`, `.npz`, `.csv`, `.nc` or `.zarr` (local or any fsspec URL). The other arguments
    mean what the `EncodeOptions` fields of the same names say (`keys` is `keys_file` there), and
    here also take Python values: keys, targets, roi, groups as lists; ceiling as a list or array; split
    as a list of test keys, a bool array (True = train) or an array of "train"/"test", one per row.
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
                                "file with one key per line) in row order, or use .npz/.csv/.nc")
    elif suffix == ".npz":
        values, container = _read_npz(spath, array, opts)
    elif suffix == ".csv":
        values, container, csv_targets = _read_csv(spath, key_column, [c for c in (split, groups)
                                                                       if isinstance(c, str)], keys is None, opts)
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
                                f"{', '.join(sorted(container)) or 'nothing else'}). Pass keys= or "
                                "key_column=")
        key_list = [str(k) for k in np.asarray(found).reshape(-1).tolist()]
    if len(key_list) != n:
        turned = " (it looks stored targets x stimuli: transpose it)" if len(key_list) == values.shape[1] else ""
        raise EncodingError(f"{spath}: {len(key_list)} keys for {n} rows of neural data (shape {values.shape}); "
                            f"the key list must have one key per row, in row order{turned}")
    if split is None and (named := [name for name in _SPLIT_NAMES if name in container]):
        warnings.warn(f"{spath} has {_fmt(named)}, which looks like a split, but no split was given: it is not "
                      f"used (held out: K folds or a random share). To hold out its test stimuli, pass "
                      f"split={named[0]!r} (--split {named[0]})", AlignmentWarning, stacklevel=2)

    target_list = _resolve_per_target(targets, "targets", container, _TARGET_NAMES, opts, spath)
    roi_list = _resolve_per_target(roi, "roi", container, _ROI_NAMES, opts, spath)
    ceiling_arr = _resolve_ceiling(ceiling, container, opts, spath)
    train = _resolve_split(split, container, key_list, opts, spath)
    group_list = _resolve_groups(groups, container, opts, spath)
    return NeuralData(values, key_list, target_list, roi_list, train, ceiling_arr, source=spath, groups=group_list)


def _npz_array(z: Any, name: str, spath: str) -> np.ndarray:
    """One array of an .npz; bytes (from h5py or MATLAB) as text, so that keys and ROI names match."""
    try:
        arr = z[name]
    except ValueError as exc:  # an object array: loading it would unpickle, which is never done
        raise EncodingError(f"{spath}: the array {name!r} holds Python objects (e.g. a pandas column of "
                            "strings), which are not read without unpickling: save it as text, "
                            f"np.savez(..., {name}=np.asarray(values, dtype=str))") from exc
    return _text(arr)


def _text(arr: np.ndarray) -> np.ndarray:
    """Bytes (from h5py, MATLAB or netCDF char arrays) as text, so that keys and names match."""
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8")
    if arr.dtype.kind == "O" and arr.size and all(isinstance(x, bytes) for x in arr.flat):
        return np.array([x.decode("utf-8") for x in arr.flat]).reshape(arr.shape)
    return arr


def _read_npz(spath: str, array: str | None, opts: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with _open(spath, "rb", opts) as f:
        # Object arrays need pickle; key arrays saved from Python lists of str are '<U', no pickle.
        with np.load(f, allow_pickle=False) as z:
            container = {name: _npz_array(z, name, spath) for name in z.files}
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
                            f"arrays: {', '.join(candidates) or 'none'}); pass array=")
    return container.pop(name), container


def _read_csv(spath: str, key_column: str, other_columns: Sequence[str], need_keys: bool,
              opts: dict) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """The responses, the key column and the named other columns (split, groups), and the target names."""
    import pandas as pd

    with _open(spath, "r", opts) as f:
        # keys stay strings ("001" must not become 1); everything else is parsed normally
        df = pd.read_csv(f, dtype={key_column: str})
    container: dict[str, np.ndarray] = {}
    if key_column in df.columns:
        container[key_column] = df.pop(key_column).astype(str).to_numpy()
    elif need_keys:
        raise EncodingError(f"{spath}: no key column {key_column!r}; columns are "
                            f"{_fmt(list(df.columns), 12)}. Pass key_column= or keys=")
    for column in other_columns:
        if column in df.columns:
            container[column] = df.pop(column).to_numpy()
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise EncodingError(f"{spath}: columns {_fmt(bad)} are not numeric; every column other than the key "
                            f"({key_column!r}), the split and the groups must hold one target's responses. Remove "
                            "them, or name the key/split/groups column with key_column= / split= / groups=")
    # numeric, but not responses: a row number would be scored as a target (and can correlate with a
    # sorted stimulus order), a True/False column is a split or a flag
    unnamed = [c for c in df.columns if str(c).startswith("Unnamed: ")]
    if unnamed:
        raise EncodingError(f"{spath}: columns {_fmt(unnamed)} have no header: pandas writes its row index so "
                            "(DataFrame.to_csv without index=False). Remove them, or give them a name if they "
                            "hold responses")
    # whole numbers that are a split or flag (0/1) or an identifier (nsd_id) would be scored as targets
    flags = [c for c in df.columns if pd.api.types.is_bool_dtype(df[c])
             or (pd.api.types.is_integer_dtype(df[c]) and set(df[c].unique().tolist()) <= {0, 1})]
    if flags:
        raise EncodingError(f"{spath}: columns {_fmt(flags)} hold True/False (or 0/1), not responses: name a split "
                            "column with split=, and remove other flags (responses that are 0/1 counts: write "
                            "them as 0.0/1.0)")
    ids = [c for c in df.columns if pd.api.types.is_integer_dtype(df[c]) and _ID_COLUMN.fullmatch(str(c))]
    if ids:
        raise EncodingError(f"{spath}: columns {_fmt(ids)} look like identifiers (whole numbers, named so), not "
                            "responses: remove them, or make one the key (key_column=)")
    return df.to_numpy(dtype=np.float64), container, [str(c) for c in df.columns]


def _read_xarray(spath: str, suffix: str, array: str | None, key_column: str,
                 opts: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import xarray as xr

    if not fsx.exists(spath, opts):
        raise EncodingError(f"file not found: {redact_text(spath)}")
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
        if array is not None:
            if array not in ds.data_vars:
                raise EncodingError(f"{spath}: no variable {array!r}; it has {', '.join(map(str, ds.data_vars))}")
            name = array
        else:
            two_d = [str(k) for k, v in ds.data_vars.items() if v.ndim == 2]
            if len(two_d) != 1:
                raise EncodingError(f"{spath}: cannot tell which variable holds the data ({len(two_d)} 2-D "
                                    f"variables: {', '.join(two_d) or 'none'}); pass array=")
            name = two_d[0]
        da = ds[name]
        # coordinates and 1-D variables along either dimension become findable by name
        container = {str(k): _text(np.asarray(v.values)) for k, v in [*ds.coords.items(), *ds.data_vars.items()]
                     if k != name and v.ndim == 1}
        stim_dim, target_dim = _stimulus_dim(ds, da, container, key_column, spath)
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


def _stimulus_dim(ds: Any, da: Any, container: dict, key_column: str, spath: str) -> tuple[Any, Any]:
    """(stimulus dim, target dim) of a 2-D variable: the dimension its keys lie along (a variable of
    targets x stimuli is read transposed), else the one its target names lie along, else the first."""
    def along(names: Sequence[str]) -> set:
        return {ds[n].dims[0] for n in names if n in container and ds[n].dims[0] in da.dims}

    keys = along((key_column,) + (_KEY_NAMES if key_column == "key" else ()))
    if len(keys) == 2:
        raise EncodingError(f"{spath}: stimulus keys lie along both dimensions {da.dims} of the data; pass "
                            "key_column= naming the variable along the stimulus dimension")
    if not keys and len(named := along(_TARGET_NAMES)) == 1:
        keys = set(da.dims) - named
    first, second = da.dims
    return (second, first) if keys == {second} else (first, second)


def _resolve_per_target(spec: Any, what: str, container: dict, defaults: Sequence[str], opts: dict,
                        spath: str) -> list[str] | None:
    if spec is None:
        found = _pick(container, None, defaults)
        return None if found is None else [str(x) for x in np.asarray(found).reshape(-1).tolist()]
    if isinstance(spec, str) and spec in container:
        return [str(x) for x in np.asarray(container[spec]).reshape(-1).tolist()]
    if _is_pathlike(spec):
        return _read_lines(_named_file(spec, what, container, opts, spath), opts)
    return [str(x) for x in spec]


def _resolve_ceiling(spec: Any, container: dict, opts: dict, spath: str) -> np.ndarray | None:
    if spec is None:
        found = _pick(container, None, _CEILING_NAMES)
        return None if found is None else _numbers(found, "ceiling", spath)
    if isinstance(spec, str) and spec in container:
        return _numbers(container[spec], f"ceiling {spec!r}", spath)
    if _is_pathlike(spec):
        s = _named_file(spec, "ceiling", container, opts, spath)
        if s.endswith(".npy"):
            with _open(s, "rb", opts) as f:
                return _numbers(np.load(f, allow_pickle=False), "noise ceiling file", s)
        try:
            return np.asarray([float(x) for x in _read_lines(s, opts)])
        except ValueError as e:
            raise EncodingError(f"noise ceiling file {s!r}: every line must be a number ({e})") from e
    return _numbers(spec, "ceiling", spath)


def _numbers(values: Any, what: str, spath: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise EncodingError(f"{spath}: {what} must hold numbers, one noise ceiling (in r) per target ({exc}); "
                            "ROI labels go to roi=") from exc


def _named_file(spec: str | os.PathLike, what: str, container: dict, opts: dict, spath: str) -> str:
    """A per-row or per-target option given by name: not one of the file's arrays, so a file of its own."""
    s = os.fspath(spec)
    if not fsx.exists(s, opts):
        raise EncodingError(f"{what} {s!r} is neither a column/array/variable of {spath} (it has "
                            f"{_fmt(sorted(container), 12)}) nor a file with one value per line")
    return s


def _resolve_split(split: Any, container: dict, keys: list[str], opts: dict, spath: str) -> np.ndarray | None:
    if split is None:
        return None
    n = len(keys)
    if isinstance(split, str) and split in container:
        return _split_values(container[split], split, n, spath)
    if _is_pathlike(split):
        s = os.fspath(split)
        if not fsx.exists(s, opts):
            raise EncodingError(f"split {s!r} is neither a column/array/variable of {spath} (it has "
                                f"{_fmt(sorted(container), 12)}) nor a file listing test keys")
        return _test_keys_to_train(_read_lines(s, opts), keys, s)
    arr = np.asarray(split)
    if arr.dtype == bool or (arr.size == n and np.issubdtype(arr.dtype, np.number)):
        return _split_values(arr, "train", n, spath)
    if arr.size == n and {str(x).strip().lower() for x in arr.tolist()} <= {"train", "test"}:
        return _split_values(arr, "split", n, spath)
    return _test_keys_to_train([str(x) for x in arr.reshape(-1).tolist()], keys, "the test key list")


def _resolve_groups(groups: Any, container: dict, opts: dict, spath: str) -> list[str] | None:
    if groups is None:
        return None
    if isinstance(groups, str) and groups in container:
        return [str(g) for g in np.asarray(container[groups]).reshape(-1).tolist()]
    if _is_pathlike(groups):
        return _read_lines(_named_file(groups, "groups", container, opts, spath), opts)
    return [str(x) for x in groups]


_TEST_WORDS = frozenset({"heldout", "holdout", "held", "hold", "val", "validation", "eval", "evaluation"})


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
    # which way True points, by the words of the name (`is_test`, `heldOut`: test stimuli; `train`: training
    # ones): a name that says neither (`split`, `fold`) would be a guess, and a wrong guess swaps the sides
    words = set(re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()))
    marks_test = bool(words & _TEST_WORDS) or any("test" in w for w in words)  # testset, istest
    marks_train = any("train" in w for w in words)  # trainval: training stimuli
    if marks_test == marks_train:
        raise EncodingError(f"{spath}: split {name!r} holds True/False, but its name does not say whether True "
                            "marks training or test stimuli: name it with train or test (is_train, is_test, "
                            "heldout), or store 'train'/'test' values in it")
    return ~flag if marks_test else flag


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


def _as_bool(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    if arr.dtype == bool:
        return arr.copy()
    if np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise EncodingError(f"{what} must be booleans (or 0/1, or 'train'/'test'); got values like {_fmt(arr.tolist())}")



def _suffix(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


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
