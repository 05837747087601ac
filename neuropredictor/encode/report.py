"""Reporting: a tidy per-layer summary table, saving scores to Zarr, the layer-wise plot, and the
JSON-able summary the CLI and the flow print."""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from neuropredictor.encode._common import EncodingError, _open

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    import xarray

    from neuropredictor.encode.options import EncodeOptions


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
        # element-wise: strings re-opened from Zarr are StringDType, which astype(str) refuses
        rois = np.array([str(x) for x in ds["roi"].values.tolist()])
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


def save_outputs(scores: xarray.Dataset, options: EncodeOptions,
                 storage_options: Mapping | None = None) -> dict[str, Any]:
    """save_scores(options.out) -> plot_scores(options.plot, default OUT.png) -> the JSON-able summary
    that `encode_command` returns (also used by the `encode` flow after its per-layer tasks)."""
    out = options.out
    save_scores(scores, out, storage_options=storage_options, overwrite=options.overwrite)
    png = options.plot or out.rstrip("/") + ".png"
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
