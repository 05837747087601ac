"""Comparing a sweep's models on the brain data: one table of every model x layer x ROI, the models ranked
per ROI by their best layer, and a plot of that ranking that stays readable with fifty models."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from neuropredictor import fs as fsx

if TYPE_CHECKING:  # pragma: no cover
    import pandas

COLUMNS = ["model", "n_stimuli", "roi", "layer", "median_r", "q25", "q75", "median_r_normalized", "chance",
           "p_value", "p_holm", "above_chance", "best"]


def comparison_table(scores: Mapping[str, str], storage_options: Mapping | None = None) -> pandas.DataFrame:
    """One row per model x layer x ROI ("all" = every target): the median held-out r over the targets, its
    interquartile range, the median of r / noise ceiling where the data has a ceiling, the chance level (the
    layer's null's 95th percentile), its p-value, adjusted by Holm over the model's layers (p_holm), whether that
    is at most 0.05 (above_chance), and `best` (the model's best layer for that ROI among those above chance);
    `n_stimuli`: the stimuli the model was scored on (fewer where some of its feature rows are invalid).
    scores: model spec -> its scores store."""
    import pandas as pd
    import xarray as xr

    from neuropredictor.encode import summary_table

    frames = []
    for model, url in scores.items():
        ds = xr.open_zarr(url, storage_options=dict(storage_options or {}) or None)
        table = summary_table(ds).rename(columns={"median": "median_r"})
        if "r_normalized" in ds:
            normalized = summary_table(ds, metric="r_normalized")[["roi", "layer", "median"]]
            table = table.merge(normalized.rename(columns={"median": "median_r_normalized"}), on=["roi", "layer"])
        else:
            table["median_r_normalized"] = np.nan
        table.insert(0, "model", model)
        table.insert(1, "n_stimuli", int(ds.attrs.get("n_stimuli", -1)))
        frames.append(table[COLUMNS])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def unequal_stimuli(table: pandas.DataFrame) -> str | None:
    """A warning when the models were scored on different numbers of stimuli (invalid rows of some models'
    stores): their scores are then not measured on one stimulus set."""
    counts = table.drop_duplicates("model").set_index("model")["n_stimuli"]
    if counts.nunique() <= 1:
        return None
    most = int(counts.max())
    fewer = ", ".join(f"{m} ({int(n)})" for m, n in counts.items() if n < most)
    return (f"the models were scored on different stimuli: {most} for most, fewer for {fewer} (invalid feature "
            "rows). Their ranking compares different stimulus sets; see each store's bad samples with "
            "`neuropredictor inspect`")


def ranking(table: pandas.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Per ROI, the models ranked by their best layer's median r: [{model, layer, median_r, above_chance}].
    A model with no layer above chance is ranked by its highest layer and marked above_chance False."""
    out: dict[str, list[dict[str, Any]]] = {}
    for roi, group in table.groupby("roi", sort=False):
        entries = []
        for model, rows in group.groupby("model", sort=False):
            best, scored = rows[rows["best"]], rows[rows["median_r"].notna()]
            # no layer above chance: its highest one; no finite r at all (an ROI without signal): ranked last
            pick = best.iloc[0] if len(best) else scored.loc[scored["median_r"].idxmax()] if len(scored) else rows.iloc[0]
            entries.append({"model": model, "layer": pick["layer"], "median_r": _num(pick["median_r"]),
                            "median_r_normalized": _num(pick["median_r_normalized"]),
                            "above_chance": None if _isna(pick["above_chance"]) else bool(pick["above_chance"])})
        out[str(roi)] = sorted(entries, key=lambda e: -np.inf if e["median_r"] is None else e["median_r"],
                               reverse=True)
    return out


def plot_comparison(table: pandas.DataFrame, path: str, storage_options: Mapping | None = None) -> str:
    """Per ROI, a horizontal bar per model (its best layer's median r, the bar's whisker its interquartile
    range over targets, a tick at that layer's chance level), ranked; hatched bars are not above chance. Up to
    three panels a row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ranked = ranking(table)
    rois = list(ranked)
    n_models = max((len(v) for v in ranked.values()), default=1)
    ncols = max(1, min(3, len(rois)))
    nrows = max(1, math.ceil(len(rois) / ncols))
    # Figure + Agg canvas, not pyplot: a notebook's backend stays its own
    fig = Figure(figsize=(6.5 * ncols, (0.28 * n_models + 1.6) * nrows + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, roi in zip(axes, rois):
        entries = ranked[roi][::-1]  # the best at the top
        rows = [table[(table["roi"] == roi) & (table["model"] == e["model"]) & (table["layer"] == e["layer"])].iloc[0]
                for e in entries]
        y = np.arange(len(entries))
        med = np.array([e["median_r"] if e["median_r"] is not None else np.nan for e in entries])
        lo = np.array([r["q25"] for r in rows])
        hi = np.array([r["q75"] for r in rows])
        bars = ax.barh(y, med, color="#4c72b0", height=0.7,
                       xerr=[np.clip(med - lo, 0, None), np.clip(hi - med, 0, None)], error_kw={"lw": 0.8})
        for bar, e in zip(bars, entries):
            if e["above_chance"] is False:
                bar.set_hatch("//")
                bar.set_facecolor("#c8c8c8")
        chance = np.array([r["chance"] for r in rows], dtype=float)
        ax.scatter(chance, y, marker="|", color="black", s=60, zorder=3, label="chance (95th pct. of null, unadjusted)")
        ax.set_yticks(y, [f"{e['model']}  [{e['layer']}]" for e in entries], fontsize=7)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_xlabel("median held-out r (best layer)")
        ax.set_title(f"{roi}")
    for ax in axes[len(rois):]:
        ax.set_visible(False)
    # below the panels, not on a bar; the title in two lines, which a single panel's width holds
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", fontsize=7, frameon=False)
    fig.suptitle("models ranked by their best layer\nwhiskers: IQR over targets; hatched: not above chance "
                 "(p adjusted for the model's layers)", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    with fsx.open_url(path, "wb", storage_options) as f:
        f.write(buf.getvalue())
    return path


def write_csv(table: pandas.DataFrame, path: str, storage_options: Mapping | None = None) -> str:
    with fsx.open_url(path, "wb", storage_options) as f:
        f.write(table.to_csv(index=False).encode("utf-8"))
    return path


def _num(x: Any) -> float | None:
    return None if _isna(x) else round(float(x), 6)


def _isna(x: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(x))
