"""A whole run in three steps, so that a flow can score each layer in its own task on arrays prepared
once: `prepare` (open the features, align the neural data by key, split) -> `score_layer` (one layer,
every outer fold) -> `assemble` (the scores Dataset). `encode` runs the three in a row;
`encode_command` adds reading the neural data, keeping each scored layer until the end (`kept`: a rerun
scores only the layers not finished), and writing the scores and the plot."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from neuropredictor.encode._common import AlignmentWarning, EncodingError
from neuropredictor.encode.chance import (CHANCE_QUANTILE, Part, chance_summary, fold_nulls, lone_groups,
                                          null_medians, permutations_needed, target_p_values)
from neuropredictor.encode.align import (SPLIT_SCHEME, align, inner_group_folds, layer_matrix, open_dataset,
                                         outer_splits, select_layers)
from neuropredictor.encode.kept import KeptLayers
from neuropredictor.encode.neural import NeuralData
from neuropredictor.encode.options import READING, EncodeOptions, FitOptions, read_with, split_reading
from neuropredictor.encode.report import check_scores_out, save_outputs, target_groups
from neuropredictor.encode.ridge import _MIN_TRAIN, _backend_for, encode_rows
from neuropredictor.encode.target_sets import TargetSet, report_unscorable, target_sets

if TYPE_CHECKING:  # pragma: no cover
    import xarray

log = logging.getLogger(__name__)

_MIN_TEST = 3  # Pearson r on fewer held-out stimuli is meaningless
_FEW_TEST = 20  # ... and noisy on fewer than this (its standard error ~ 1 / sqrt(n - 2))


@dataclass
class Prepared:
    """What every layer's fit shares, computed once: the matched stimuli, their responses and splits."""

    ds: Any  # the features Dataset (read lazily, one layer at a time)
    features_name: str
    layers: list[str]  # in model order
    neural: NeuralData
    rows: np.ndarray  # features rows of the matched stimuli, in store order
    keys: list[str]  # their keys
    Y: np.ndarray  # (matched stimuli, usable targets)
    usable: np.ndarray  # indices of the targets that are not NaN everywhere
    splits: list[tuple[np.ndarray, np.ndarray]]  # (train, test) rows of Y, one pair per outer fold
    report: dict[str, Any]  # alignment report and split
    # with groups: per outer fold, the alpha search's (train, test) folds over its training rows, by group
    inner: list[list[tuple[np.ndarray, np.ndarray]]] | None = None
    # targets by the stimuli they were measured on, each set with its own cut of the splits (one set when Y
    # has no NaN); see `target_sets`
    sets: list[TargetSet] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    groups: np.ndarray | None = None  # each matched stimulus's group (`groups`): the chance tests move whole groups


@dataclass
class LayerScores:
    """One layer's held-out scores over the usable targets: means over the outer folds (alpha: median)."""

    layer: str
    r: np.ndarray
    r2: np.ndarray
    alpha: np.ndarray
    n_features: int
    solver: str
    backend: str
    seconds: float
    null: np.ndarray | None = None  # (permutations, groups) null medians of r, see `chance`
    p: np.ndarray | None = None  # per target, its permutation p-value (see `chance.target_p_values`)


def prepare(features: str | xarray.Dataset, neural: NeuralData | str, options: FitOptions | None = None, *,
            storage_options: Mapping | None = None, **fields: Any) -> Prepared:
    """Open the features, align the neural data to them by key (an `AlignmentWarning` reports what is
    dropped), and split the matched stimuli. Options: `FitOptions`, as an object and/or keywords; with
    `neural` a file, also how to read it (`EncodeOptions`' keys_file, split, roi, groups, ...)."""
    reading, fields = split_reading(fields)
    if isinstance(options, EncodeOptions) and not isinstance(neural, NeuralData):  # its split, groups, roi ...
        reading = {**{k: getattr(options, k) for k in READING}, **reading}
    opts = FitOptions.resolve(options, fields)
    started = time.perf_counter()
    _backend_for(opts.device)  # a device that is not there fails now, not in every layer's fit
    ds, layer_order, features_name = open_dataset(features, storage_options)
    neural = read_with(neural, reading, storage_options)
    layers = select_layers(opts.layers, layer_order)
    if 0 < opts.permutations < (enough := permutations_needed(len(layers))):
        log.warning("%d permutations cannot put any of %d layers above chance once p-values are adjusted for the "
                    "number of layers (the smallest p is 1/%d); use permutations >= %d", opts.permutations,
                    len(layers), opts.permutations + 1, enough)
    aligned = align(ds, neural)
    fi, ni, report, usable = aligned["features_rows"], aligned["neural_rows"], aligned["report"], aligned["targets"]
    keys = [neural.keys[i] for i in ni]
    groups = None if neural.groups is None else np.asarray(neural.groups, dtype=object)[ni]
    folds = outer_splits(keys, neural.train[ni] if neural.train is not None else None, opts.test_fraction,
                         opts.folds, opts.seed, groups)
    need = max(_MIN_TRAIN, 2 * opts.inner_folds)
    held_out = sum(len(te) for _, te in folds["splits"])  # K folds hold every stimulus out once
    if _MIN_TEST <= held_out < _FEW_TEST:
        warnings.warn(f"{held_out} held-out stimuli: a target's r on so few is noisy (its standard error is about "
                      f"{1 / np.sqrt(held_out - 2):.2f}); hold out more, or use folds=", AlignmentWarning, stacklevel=2)
    for tr, te in folds["splits"]:
        if len(tr) < need or len(te) < _MIN_TEST:
            fix = ("use fewer folds" if opts.folds and len(te) < _MIN_TEST else
                   "this is too few stimuli to fit and score" if opts.folds else
                   "check the given split" if neural.train is not None else "change test_fraction")
            raise EncodingError(f"after alignment the split leaves {len(tr)} training and {len(te)} test stimuli; "
                                f"need at least {need} to train ({_MIN_TRAIN}, and 2 per inner fold: "
                                f"inner_folds={opts.inner_folds}) and {_MIN_TEST} to test: {fix}")
    inner = None if groups is None else [inner_group_folds(groups[tr], opts.inner_folds, opts.seed)
                                         for tr, _ in folds["splits"]]
    if groups is not None and opts.permutations and any(lone_groups(groups[te]) for _, te in folds["splits"]):
        log.warning("the chance tests move whole groups onto groups of the same size, and in some fold most held-out "
                    "stimuli are in groups of a size no other group there has: those stay in place, and the p-values "
                    "come out larger than they should (valid, with less power); groups of equal size avoid it")
    Y = neural.values[np.ix_(ni, usable)]
    sets = target_sets(Y, folds["splits"], inner, groups, opts.inner_folds, opts.seed, need, _MIN_TEST)
    report.update(split=folds["how"], n_train=int(folds["n_train"]), n_test=int(folds["n_test"]),
                  n_groups=0 if groups is None else len(set(groups.tolist())), target_sets=len(sets))
    report_unscorable(sets, Y, [neural.targets[i] for i in usable], report, need, _MIN_TEST)  # type: ignore[index]
    return Prepared(ds, features_name, layers, neural, fi, keys, Y, usable, folds["splits"], report, inner,
                    sets, started, groups)


def score_layer(prep: Prepared, layer: str, options: FitOptions | None = None, **fields: Any) -> LayerScores:
    """Fit and score one layer on every outer fold of `prep`."""
    opts = FitOptions.resolve(options, fields)
    t0 = time.perf_counter()
    X = layer_matrix(prep.ds, layer, prep.rows, prep.keys)
    per_fold = {name: np.full((len(prep.splits), prep.Y.shape[1]), np.nan) for name in ("r", "r2", "alpha")}
    tested: list[list[Part]] = [[] for _ in prep.splits]  # for the null
    used: dict[str, set[str]] = {"solver": set(), "backend": set()}  # auto chooses per fit, by its shape
    for ts in prep.sets:
        every = len(ts.targets) == prep.Y.shape[1]
        for i, pair in enumerate(ts.splits):
            if pair is None:  # too few of this set's stimuli in this fold
                continue
            tr, te = pair
            y_train, y_test = (prep.Y[rows] if every else prep.Y[np.ix_(rows, ts.targets)] for rows in (tr, te))
            last = encode_rows(X, tr, te, y_train, y_test, opts.alpha_grid, opts.inner_folds,
                               cv=ts.inner[i] if ts.inner is not None else None, seed=opts.seed, device=opts.device,
                               dtype=opts.dtype, solver=opts.solver, batch_bytes=opts.batch_bytes,
                               return_predictions=bool(opts.permutations))
            for name, values in per_fold.items():
                values[i, ts.targets] = last[name]
            for name, seen in used.items():
                seen.add(last[name])
            if opts.permutations:  # where this set's test stimuli lie among the fold's
                tested[i].append((ts.targets, np.flatnonzero(ts.rows[prep.splits[i][1]]), y_test,
                                  last["predictions"]))
    r = _fold_mean(per_fold["r"])
    null = p = None
    if opts.permutations:
        groups = [mask[prep.usable] for _, mask in target_groups(prep.neural.roi, prep.neural.n_targets)]
        folds = [(len(te), parts) for (_, te), parts in zip(prep.splits, tested)]
        blocks = None if prep.groups is None else [prep.groups[te] for _, te in prep.splits]
        nulls = fold_nulls(folds, prep.Y.shape[1], opts.permutations, opts.seed, blocks)
        null, p = null_medians(nulls, groups), target_p_values(folds, nulls, prep.Y.shape[1])
        del nulls
    solver, backend = ("+".join(sorted(seen)) or "none" for seen in used.values())
    log.info("layer %s: %d features, median r %.3f (%s, %s)", layer, X.shape[1],
             float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan"), solver, backend)
    alphas = per_fold["alpha"]
    # a target the layer does not predict rightly takes the largest alpha: not a sign the grid is too short.
    # Predicted: r above what chance gives 5 % of targets on that fold's held-out stimuli (one-sided, Fisher z)
    n_test = np.array([len(te) for _, te in prep.splits], dtype=float)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = per_fold["r"] > 1.645 / np.sqrt(np.maximum(n_test - 3, 1))
    chosen = np.isfinite(alphas)
    _warn_grid_edges(layer, alphas[chosen], predicted[chosen], opts.alpha_grid)
    return LayerScores(layer, r, _fold_mean(per_fold["r2"]), _lower_median(alphas), int(X.shape[1]),
                       solver, backend, time.perf_counter() - t0, null, p)


def _lower_median(per_fold: np.ndarray) -> np.ndarray:
    """Per target, the lower middle of the folds' alphas that scored it (a value of the grid, also for an even
    number of folds); NaN where no fold did."""
    n = np.isfinite(per_fold).sum(0)
    middle = np.take_along_axis(np.sort(per_fold, axis=0), (np.maximum(n, 1) - 1)[None] // 2, axis=0)[0]
    return np.where(n > 0, middle, np.nan)


def _fold_mean(per_fold: list[np.ndarray]) -> np.ndarray:
    """Mean over the outer folds, of the folds that scored the target: a target constant in one fold's
    test stimuli has no r there, and would otherwise drop out of every summary."""
    stacked = np.asarray(per_fold, dtype=np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": NaN where no fold scored
        return np.nanmean(stacked, axis=0)


_EDGE_WARN = 0.05  # share of targets at an end of the alpha grid worth a warning


def _warn_grid_edges(layer: str, alphas: np.ndarray, predicted: np.ndarray, grid: np.ndarray) -> None:
    """Warn when many targets the layer predicts chose an end of the grid (a share of all choices, so that
    the few noise targets chance passes as predicted do not count): their best alpha may lie beyond it."""
    if len(grid) < 2 or not alphas.size:
        return
    for end, side, fix in ((grid.max(), "largest", "upward"), (grid.min(), "smallest", "downward")):
        share = float((np.isclose(alphas, end) & predicted).mean())
        if share > _EDGE_WARN:
            log.warning("layer %s: %.0f%% of the alphas chosen (targets x folds) are the grid's %s, %g, for targets "
                        "it predicts; the best may lie beyond it: extend the grid %s (alphas=)", layer, 100 * share,
                        side, end, fix)


def assemble(prep: Prepared, layers: Sequence[LayerScores], options: FitOptions | None = None,
             **fields: Any) -> xarray.Dataset:
    """The scores Dataset of a run from its layers' scores (in the order given).

    Variables: r, r2, alpha, p (layer x target; p: a target's permutation p-value, with the chance test; see
    `chance.target_p_values`), r_normalized and ceiling if the neural data has a noise ceiling (r / ceiling,
    NaN where the ceiling is not positive). Coordinates: layer, target, roi (if known), and per layer
    n_features, solver, backend, seconds. Attrs: the alignment report (stimuli
    matched and dropped per reason with examples), the split, the options, and the chance test (see
    `chance`) as JSON: {group: {"chance" | "null_low" | "p_value": [one per layer]}}, group = "all"
    then each ROI. Targets that are NaN for every stimulus keep NaN scores.
    """
    import xarray as xr

    opts = FitOptions.resolve(options, fields)
    neural, usable = prep.neural, prep.usable
    shape = (len(layers), neural.n_targets)
    tested = bool(layers) and all(p.p is not None for p in layers)
    values = {name: np.full(shape, np.nan) for name in ("r", "r2", "alpha", *(["p"] if tested else []))}
    for li, part in enumerate(layers):
        for name, v in values.items():
            v[li, usable] = getattr(part, name)
    coords: dict[str, Any] = {"layer": ("layer", [p.layer for p in layers]),
                              "target": ("target", list(neural.targets or []))}
    for name in ("n_features", "solver", "backend", "seconds"):
        coords[name] = ("layer", [getattr(p, name) for p in layers])
    measured = np.zeros(neural.n_targets, np.int64)  # targets NaN everywhere: 0
    for ts in prep.sets:
        measured[usable[ts.targets]] = int(ts.rows.sum())
    coords["n_measured"] = ("target", measured, {"long_name": "matched stimuli the target was measured on"})
    if neural.roi is not None:
        coords["roi"] = ("target", list(neural.roi))
    long_names = {"r": "Pearson r, held-out stimuli", "r2": "R^2, held-out stimuli",
                  "alpha": "ridge alpha chosen by inner cross-validation",
                  "p": "permutation p-value of the held-out r: each fold's exact p, the smallest times the folds "
                       "(Bonferroni; one split: exact); not adjusted for the number of targets"}
    data_vars: dict[str, Any] = {k: (("layer", "target"), v, {"long_name": long_names[k]}) for k, v in values.items()}
    ceil = neural.ceiling
    if ceil is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            rn = np.where(ceil[None, :] > 0, values["r"] / ceil[None, :], np.nan)
        data_vars["r_normalized"] = (("layer", "target"), rn, {"long_name": "r / noise ceiling"})
        data_vars["ceiling"] = (("target",), ceil, {"long_name": "noise ceiling (r)"})
    chance: dict[str, dict[str, list]] = {}
    if tested:  # with its groups' nulls
        groups = target_groups(neural.roi, neural.n_targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a group without finite r has no median: NaN
            tests = [chance_summary(np.array([np.nanmedian(values["r"][li, m]) for _, m in groups]), p.null)
                     for li, p in enumerate(layers)]
        # in attrs (JSON, like the alignment report): the scores keep their (layer, target) shape
        chance = {g: {k: [None if np.isnan(t[k][gi]) else float(t[k][gi]) for t in tests] for k in tests[0]}
                  for gi, (g, _) in enumerate(groups)}
    out = xr.Dataset(data_vars, coords=coords)
    report = prep.report
    out.attrs.update({
        "features": prep.features_name,
        "neural": str(neural.source or ""),
        "n_stimuli": len(prep.keys),
        "n_train": report["n_train"],
        "n_test": report["n_test"],
        "split": report["split"],
        "split_scheme": SPLIT_SCHEME,
        "n_groups": report.get("n_groups", 0),
        "target_sets": len(prep.sets),
        "folds": opts.folds or 0,
        "inner_folds": opts.inner_folds,
        "seed": opts.seed,
        "test_fraction": opts.test_fraction,
        "alphas": opts.alpha_grid.tolist(),
        "dtype": opts.dtype,
        "permutations": opts.permutations,
        "chance_test": ("held-out response rows permuted against the same predictions; chance = "
                        f"{CHANCE_QUANTILE:.0%} of the null median r, per layer and group; above chance: p adjusted "
                        "by Holm over the layers at most 5 %") if chance else "none",
        "chance": json.dumps(chance),
        "seconds": round(time.perf_counter() - prep.started, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "alignment": json.dumps(report),
        **{f"dropped_{reason}": int(e["count"]) for reason, e in report["dropped"].items()},
    })
    return out


def encode(features: str | xarray.Dataset, neural: NeuralData | str, options: FitOptions | None = None, *,
           storage_options: Mapping | None = None, **fields: Any) -> xarray.Dataset:
    """Score every layer of a features store as an encoding model of the neural data.

    features: a store URL (read with `open_features`) or a Dataset shaped like its result.
    neural: NeuralData, or a path given to `load_neural` (keys inside the file, or keys_file=).
    options: `FitOptions` (or `EncodeOptions`) and/or its fields as keywords, e.g.
        `encode(url, neural, layers="a,b", folds=5, device="cpu")`; with neural a file, also how to read it:
        `encode(url, "betas.npz", roi="roi", split="is_test")`.
    Per layer and target, the ridge alpha is chosen by `inner_folds`-fold cross-validation on the
    training stimuli only. Held-out stimuli: the neural data's own split if it has one; else `folds`
    outer folds (every stimulus held out once; scores averaged over the folds that score a target, alpha
    the lower median of the folds' choices); else a random `test_fraction` (each stimulus placed by a hash
    of the seed and its key). With the neural data's `groups`, whole groups are placed (outer and inner
    folds), so that no group is on both sides of a split.

    Returns the Dataset described in `assemble`.
    """
    reading, fields = split_reading(fields)
    opts = FitOptions.resolve(options, fields)
    prep = prepare(features, neural, opts, storage_options=storage_options, **reading)
    return assemble(prep, [score_layer(prep, layer, opts) for layer in prep.layers], opts)


_KEPT_FORMAT = 5  # bump when LayerScores or the fingerprint change meaning (2: targets in sets, their null; 3: p;
# 4: p with K folds, Bonferroni over the folds; 5: with groups, whole groups shuffled)


def fingerprint(prep: Prepared, options: FitOptions) -> str | None:
    """What a layer's scores depend on, hashed: the features store (config, `content_id`) and the rows read, the
    responses, the splits (inner ones too), the chance test's groups and the fit options (not the device or
    batch size). None when the features carry no config hash or content (a Dataset made in memory, or opened with
    rows not committed: nothing says that its numbers are those of an earlier run)."""
    config_hash, content = prep.ds.attrs.get("config_hash"), prep.ds.attrs.get("content")
    if not config_hash or not content:
        return None
    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            if isinstance(p, np.ndarray):
                h.update(str((p.dtype.str, p.shape)).encode())
                h.update(np.ascontiguousarray(p).tobytes())
            else:
                h.update(json.dumps(p, sort_keys=True, default=str).encode())
            h.update(b"\0")

    # content: the store replaced with the same config, or a shard extracted again in place, are other rows
    add(_KEPT_FORMAT, config_hash, content, prep.keys, prep.rows, prep.Y, prep.usable)
    for train, test in [*prep.splits, *(pair for fold in prep.inner or [] for pair in fold)]:
        add(train, test)
    if len(prep.sets) > 1:  # the splits as cut to each set's stimuli
        for ts in prep.sets:
            add(ts.targets)
            for i, pair in enumerate(ts.splits):
                add(i, *(pair or ()), *(a for inner in (ts.inner[i] or [] if ts.inner else []) for a in inner))
    roi = prep.neural.roi
    add(None if roi is None else [str(x) for x in roi])
    add(None if prep.groups is None else [str(x) for x in prep.groups])  # the chance tests move whole groups
    add({k: getattr(options, k) for k in ("inner_folds", "seed", "dtype", "solver", "permutations")},
        options.alpha_grid)
    return h.hexdigest()[:16]


def kept_layers(out: str, prep: Prepared, options: FitOptions, storage_options: Mapping | None = None) -> KeptLayers:
    """Where a run scoring into `out` keeps its finished layers (OUT.partial/), for these inputs."""
    return KeptLayers(out, fingerprint(prep, options), storage_options)


def score_kept(prep: Prepared, layer: str, options: FitOptions, kept: KeptLayers | None) -> LayerScores:
    """`score_layer`, or the layer's scores as an earlier run of the same inputs kept them; kept once scored."""
    if kept is not None and (fields := kept.load(layer)) is not None:
        log.info("layer %s: scored by an earlier run of the same inputs (kept in %s)", layer, kept.name)
        return LayerScores(**fields)
    part = score_layer(prep, layer, options)
    if kept is not None:
        try:
            kept.save(dataclasses.asdict(part))
        except Exception as exc:  # keeping is for a rerun's sake: a full disk must not cost this layer's fit
            log.warning("layer %s: its scores could not be kept in %s (%s: %s); the run goes on", layer, kept.name,
                        type(exc).__name__, exc)
    return part


def score_layers(prep: Prepared, options: FitOptions, kept: KeptLayers | None = None,
                 score: Callable[[Prepared, str, FitOptions, KeptLayers | None], LayerScores] = score_kept,
                 ) -> list[LayerScores]:
    """Every layer of `prep` with `score` (the `encode` flow passes its task): a layer that fails does not
    stop the others; `check_failed` raises once all were tried."""
    parts, failed = [], {}
    for layer in prep.layers:
        try:
            parts.append(score(prep, layer, options, kept))
        except Exception as exc:  # one layer's failure (memory, most often) must not cost the others
            failed[layer] = f"{type(exc).__name__}: {exc}"
            log.error("layer %s could not be scored: %s", layer, failed[layer])
    check_failed(failed, len(prep.layers), kept)
    return parts


def check_failed(failed: Mapping[str, str], n_layers: int, kept: KeptLayers | None) -> None:
    """EncodingError naming the layers that could not be scored, and what was kept of the others."""
    if not failed:
        return
    reasons = "; ".join(f"{layer}: {error}" for layer, error in failed.items())
    done = n_layers - len(failed)
    keep = (f"the {done} layers scored are kept in {kept.name}: run the same command again to score only "
            "the others" if kept is not None and kept.enabled and done else "nothing was kept")
    raise EncodingError(f"{len(failed)} of {n_layers} layers could not be scored ({reasons}); no scores were "
                        f"written, {keep}. To go without a layer, leave it out with `layers`.")


def encode_command(options: EncodeOptions | None = None, *, storage_options: Mapping | None = None,
                   **fields: Any) -> dict[str, Any]:
    """`neuropredictor encode`: read the neural data -> score each layer (kept beside OUT until the scores
    are saved, so that a rerun after a crash scores only the layers not finished; a layer that fails does not
    stop the others) -> save the scores -> plot -> the JSON-able summary of `save_outputs`. Options:
    `EncodeOptions`, as an object and/or keywords. Errors a user can fix are EncodingError (a
    NeuroPredictorError)."""
    opts = EncodeOptions.resolve(options, fields)
    check_scores_out(opts.out, storage_options, opts.overwrite)
    prep = prepare(opts.features, opts.read_neural(storage_options), opts, storage_options=storage_options)
    kept = kept_layers(opts.out, prep, opts, storage_options)
    parts = score_layers(prep, opts, kept)
    summary = save_outputs(assemble(prep, parts, opts), opts, storage_options=storage_options)
    kept.clear()
    return summary
