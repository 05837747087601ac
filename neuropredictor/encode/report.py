"""Reporting: a tidy per-layer summary table, saving scores to Zarr, the layer-wise plot, and the
JSON-able summary the CLI and the flow print."""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from neuropredictor.encode._common import ALL_TARGETS, EncodingError, _open
from neuropredictor.encode.chance import CHANCE_QUANTILE, holm

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    import xarray

    from neuropredictor.encode.options import EncodeOptions


def target_groups(roi: Sequence[Any] | None, n_targets: int) -> list[tuple[str, np.ndarray]]:
    """The groups scores are summarised over: "all" targets, then each ROI in order of first
    appearance, as boolean masks over the targets."""
    groups = [(ALL_TARGETS, np.ones(n_targets, bool))]
    if roi is not None:
        labels = np.array([str(x) for x in roi])  # str() each: StringDType from Zarr refuses astype(str)
        groups += [(g, labels == g) for g in dict.fromkeys(labels.tolist())]
    return groups


def summary_table(ds: xarray.Dataset, metric: str = "r") -> pandas.DataFrame:
    """Per-layer summary of a score Dataset, tidy: one row per (roi, layer).

    roi is "all" for every target together, then each ROI (if the scores have `roi`). Columns:
    roi, layer, n_targets (with a finite score), median, q25, q75, mean (of `metric`, default r),
    median_r2; from the chance test (NaN / NA when the scores have none, see `chance`): chance (the
    chance level of the median r, the layer's null's 95th percentile), null_low, p_value (the layer's
    own), p_holm (p_value adjusted by Holm over the roi's layers), above_chance (p_holm at most 0.05);
    best (the layer with the highest median within that roi among those above chance; untested, among those whose
    median is above 0: an roi whose layers are all at chance, or untested all at or below 0, has none). The best
    layer per ROI is therefore `df[df.best]`.
    """
    import pandas as pd

    if metric not in ds:
        raise EncodingError(f"no variable {metric!r} in the scores; have {', '.join(map(str, ds.data_vars))}")
    values = np.asarray(ds[metric].values, dtype=np.float64)
    r = np.asarray(ds["r"].values, dtype=np.float64)
    r2 = np.asarray(ds["r2"].values, dtype=np.float64) if "r2" in ds else np.full_like(r, np.nan)
    layers = [str(x) for x in ds["layer"].values.tolist()]
    tests = json.loads(ds.attrs.get("chance", "{}"))  # {group: {"chance": [per layer], ...}}
    rois = ds["roi"].values.tolist() if "roi" in ds.coords else None
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups give NaN, which is the answer
        for roi, mask in target_groups(rois, ds.sizes["target"]):
            group_rows = []
            for li, layer in enumerate(layers):
                fin = values[li, mask][np.isfinite(values[li, mask])]
                row = {"roi": roi, "layer": layer, "n_targets": int(fin.size),
                       "median": float(np.median(fin)) if fin.size else np.nan,
                       "q25": float(np.percentile(fin, 25)) if fin.size else np.nan,
                       "q75": float(np.percentile(fin, 75)) if fin.size else np.nan,
                       "mean": float(fin.mean()) if fin.size else np.nan,
                       "median_r2": float(np.nanmedian(r2[li, mask]))}
                for k in ("chance", "null_low", "p_value"):
                    v = tests.get(roi, {}).get(k, [None] * len(layers))[li]
                    row[k] = np.nan if v is None else v
                group_rows.append(row)
            # by the p-value adjusted for the number of layers (see `chance`), not by the chance level (the
            # null's 95th percentile, interpolated and per layer)
            for g, p in zip(group_rows, holm(np.array([g["p_value"] for g in group_rows]))):
                g["p_holm"] = p
                g["above_chance"] = bool(p <= 1 - CHANCE_QUANTILE) if np.isfinite(p) else None
            # above chance; untested (no permutations), only if it predicts at all: a median above 0
            eligible = [i for i, g in enumerate(group_rows) if g["above_chance"] is True
                        or (g["above_chance"] is None and g["median"] > 0)]
            best = max(eligible, key=lambda i: group_rows[i]["median"], default=-1)
            rows += [{**g, "best": i == best} for i, g in enumerate(group_rows)]
    columns = ["roi", "layer", "n_targets", "median", "q25", "q75", "mean", "median_r2", "chance", "null_low",
               "p_value", "p_holm", "above_chance", "best"]
    df = pd.DataFrame(rows, columns=columns).astype({"above_chance": "boolean"})
    df.attrs["metric"] = metric
    return df


def describe_split(attrs: Mapping[str, Any]) -> str:
    """The held-out design of a run in words: "5-fold CV, 600 stimuli", "given split: 480 train / 120 test"."""
    how = str(attrs.get("split", ""))
    grouped = f", by group ({attrs['n_groups']} groups)" if attrs.get("n_groups") else ""
    if how.endswith("-fold"):
        return f"{how} CV, {attrs['n_stimuli']} stimuli{grouped}"
    if "n_train" not in attrs:
        return how
    return (f"{'given' if how == 'given' else 'random'} split: {attrs['n_train']} train / {attrs['n_test']} test"
            + grouped)


def check_scores_out(url: str, storage_options: Mapping | None = None, overwrite: bool = False) -> None:
    """EncodingError unless scores may be written at url: nothing there, or scores and overwrite=True (a
    features store, or a folder with anything else in it, is never deleted: writing replaces a folder
    whole). Called before the fit too, so that a refusal does not come after hours of it."""
    from neuropredictor import fs as fsx
    from neuropredictor.redact import redact_text

    # a missing bucket, or a file in the way, is refused now, not after every layer's fit
    fs, root, exists = fsx.check_creatable(url, storage_options, error=EncodingError, what="the scores store")
    if not exists or not fsx.listing(fs, root):
        return
    if fs.exists(f"{root}/manifest.json"):
        raise EncodingError(f"{redact_text(url)!r} is a features store; write the scores elsewhere "
                            "(e.g. next to it, as RUN-scores.zarr)")
    group, _damaged = fsx.read_json(fs, f"{root}/zarr.json")
    if "alignment" not in ((group or {}).get("attributes") or {}):  # what every scores store carries
        raise EncodingError(f"{redact_text(url)!r} holds something other than scores, which writing them "
                            "would delete: choose another path, or empty it yourself")
    if not overwrite:
        raise EncodingError(f"{redact_text(url)!r} already exists; pass overwrite=True or choose another path")


def save_scores(ds: xarray.Dataset, url: str, storage_options: Mapping | None = None,
                overwrite: bool = False) -> str:
    """Write the scores as a Zarr v3 store at url (local path or any fsspec URL); returns url.

    An existing store at url is replaced only with overwrite=True, and only when it holds scores (a
    features store, or a folder with anything else in it, is never deleted: writing replaces a folder whole).
    """
    check_scores_out(url, storage_options, overwrite)
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
    """PNG of layer-wise scores, one panel per group (all targets, then each ROI): the median `metric`
    per layer (model order) with its interquartile band over targets, the chance band of the
    permutation test (5th-95th percentile of the null median r; metric r only), hollow markers for
    layers not above chance, a star on the best layer, the median noise ceiling of the group's targets where
    the data has one; the title states the split. Returns the path."""
    fig = _scores_figure(ds, metric)
    spath = os.fspath(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with _open(spath, "wb", dict(storage_options or {})) as f:
        f.write(buf.getvalue())
    return spath


def _scores_figure(ds: xarray.Dataset, metric: str) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = summary_table(ds, metric)
    layers = [str(x) for x in ds["layer"].values.tolist()]
    x = np.arange(len(layers))
    groups = list(dict.fromkeys(table.roi.tolist()))
    rois = ds["roi"].values.tolist() if "roi" in ds.coords else None
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    # Figure + Agg canvas directly, not pyplot: no global backend switch in the caller's session.
    fig = Figure(figsize=(ncols * max(4.0, 0.5 * len(layers) + 2.0), 3.4 * nrows + 0.5), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, roi in zip(axes, groups):
        sub = table[table.roi == roi]
        med = sub["median"].to_numpy()
        if metric == "r" and sub["chance"].notna().any():
            ax.fill_between(x, sub["null_low"], sub["chance"], color="tab:red", alpha=0.15, lw=0,
                            label="chance: null median r, 5-95 % (unadjusted)")
        ax.fill_between(x, sub["q25"], sub["q75"], color="0.6", alpha=0.35, lw=0, label="targets, IQR")
        ax.plot(x, med, color="k", lw=1.5, label="median")
        above = sub["above_chance"].fillna(True).to_numpy(bool)
        ax.scatter(x[above], med[above], color="k", s=18, zorder=3)
        ax.scatter(x[~above], med[~above], facecolor="white", edgecolor="k", s=18, zorder=3,
                   label="not above chance (p adjusted for the layers)" if (~above).any() else None)
        best = sub["best"].to_numpy(bool)
        ax.scatter(x[best], med[best], marker="*", s=150, color="tab:orange", zorder=4, label="best layer")
        ax.axhline(0.0, color="0.3", lw=0.6, ls=":")
        if metric in ("r", "r_normalized") and "ceiling" in ds:
            mask = target_groups(rois, ds.sizes["target"])[groups.index(roi)][1]
            ceiling = ds["ceiling"].values[mask]
            level = 1.0 if metric == "r_normalized" else float(np.nanmedian(ceiling)) if np.isfinite(ceiling).any() \
                else np.nan
            if np.isfinite(level):
                ax.axhline(level, color="tab:green", lw=1.0, ls="--", label="noise ceiling (median of targets)")
        ax.set_title(f"{roi} ({int(sub['n_targets'].max())} targets)", fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(layers, rotation=45 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    axes[0].set_ylabel({"r": "held-out Pearson r", "r2": "held-out R²", "r_normalized": "r / noise ceiling"}
                       .get(metric, metric))
    axes[0].legend(fontsize=7, loc="best", frameon=False)
    name = str(ds.attrs.get("features", ""))
    name = "" if name.startswith("<") else name.rstrip("/").rsplit("/", 1)[-1]
    fig.suptitle("  ".join(t for t in (f"encoding scores {name}".strip(), describe_split(ds.attrs)) if t), fontsize=9)
    fig.tight_layout()
    return fig


def save_outputs(scores: xarray.Dataset, options: EncodeOptions,
                 storage_options: Mapping | None = None) -> dict[str, Any]:
    """plot_scores(options.plot, default OUT.png) -> save_scores(options.out) -> the JSON-able summary
    that `encode_command` returns (also used by the `encode` flow after its per-layer tasks): median r
    per layer for all targets ("layers") and per ROI ("rois"), the chance levels and which layers are
    above them, the best layer overall and per ROI (None: no layer above chance), the split."""
    import pandas as pd

    out = options.out
    png = options.plot or out.rstrip("/") + ".png"
    # the plot first: a plot that cannot be written must not leave scores that a rerun then refuses to replace
    plot_scores(scores, png, storage_options=storage_options)
    save_scores(scores, out, storage_options=storage_options, overwrite=options.overwrite)
    table = summary_table(scores)
    groups = {roi: sub for roi, sub in table.groupby("roi", sort=False)}

    def per_layer(sub: pandas.DataFrame, column: str) -> dict[str, Any]:  # JSON-able: NaN / NA -> None
        return {row.layer: None if pd.isna(v := getattr(row, column)) else
                (bool(v) if column == "above_chance" else round(float(v), 4)) for row in sub.itertuples()}

    best = {roi: next(iter(sub.layer[sub.best]), None) for roi, sub in groups.items()}
    return {
        "scores": out,
        "plot": png,
        "split": describe_split(scores.attrs),
        "layers": per_layer(groups[ALL_TARGETS], "median"),
        "rois": {roi: per_layer(sub, "median") for roi, sub in groups.items() if roi != ALL_TARGETS},
        "chance": {roi: per_layer(sub, "chance") for roi, sub in groups.items()},
        "above_chance": {roi: per_layer(sub, "above_chance") for roi, sub in groups.items()},
        "permutations": int(scores.attrs.get("permutations", 0)),
        "best_layer": best[ALL_TARGETS],
        "best_layer_per_roi": {roi: layer for roi, layer in best.items() if roi != ALL_TARGETS},
        "n_train": int(scores.attrs["n_train"]),
        "n_test": int(scores.attrs["n_test"]),
        "dropped": {k[len("dropped_"):]: int(v) for k, v in scores.attrs.items() if k.startswith("dropped_")},
    }
