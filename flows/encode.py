"""The `encode` flow: one task per layer (with retries) fits ridge encoding models of the neural data,
then the scores are saved, plotted and summarised. Thin orchestration over `neuropredictor.encode`."""

from __future__ import annotations

import base64

import fsspec
import xarray as xr
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from neuropredictor import encode as enc
from neuropredictor.store import FeatureStore


class EncodeParameters(BaseModel):
    """Encoding models of neural data from every extracted layer: what to fit, where scores go."""

    model_config = ConfigDict(extra="forbid")

    features: str = Field(description="Features store written by the extract flow (path or s3://...).")
    neural: str = Field(description="Neural data (stimuli x targets): .npy, .npz, .csv, .nc or .zarr.")
    out: str = Field(description="Where the scores go (a Zarr store); the plot is written next to it (.png).")
    # not named `keys`: a model with a `keys` attribute looks like a mapping to Prefect's parameter handling
    keys_file: str | None = Field(None, description="Text file of stimulus keys, one per line (needed for .npy).")
    key_column: str = Field("key", description="Column / array / coordinate of NEURAL holding the stimulus keys.")
    split: str | None = Field(None, description="Train/test split: a column or array name in NEURAL, or a text "
                              "file of test keys. Default: a random held-out fraction.")
    folds: int | None = Field(None, ge=2, description="K outer folds instead of one split.")
    layers: list[str] | None = Field(None, description="Layers to score (default: every layer of the store).")
    alphas: str | None = Field(None, description="Ridge grid, e.g. '1,10,100' or 'logspace:-2:6:17'.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Held-out fraction when no split is given.")
    inner_folds: int = Field(5, ge=2, description="Folds of the per-target alpha search on training stimuli.")
    seed: int = Field(0, description="Seed of random splits and folds.")
    device: str = Field("auto", description="auto (CUDA if present), cpu, cuda, cuda:N.")
    targets: str | None = Field(None, description="Target names: a name inside NEURAL or a text file.")
    roi: str | None = Field(None, description="ROI label per target: a name inside NEURAL or a text file.")
    ceiling: str | None = Field(None, description="Noise ceiling per target (r): a name inside NEURAL or a file.")
    overwrite: bool = Field(False, description="Replace existing scores at OUT.")
    retries: int = Field(1, ge=0, description="Retries of a failed layer task.")


@task(name="encode-layer", task_run_name="{layer}", cache_policy=NO_CACHE)
def encode_layer_task(params: EncodeParameters, neural: enc.NeuralData, layer: str) -> xr.Dataset:
    return enc.encode(params.features, neural, layers=[layer], alphas=enc.parse_alphas(params.alphas),
                      test_fraction=params.test_fraction, n_folds=params.inner_folds, seed=params.seed,
                      device=params.device, outer_folds=params.folds)


@flow(name="encode", validate_parameters=True)
def encode_flow(params: EncodeParameters) -> dict:
    """Score every layer of a features store as an encoding model of neural data (Pearson r, R²)."""
    logger = get_run_logger()
    neural = enc.load_neural(params.neural, keys=params.keys_file, key_column=params.key_column, split=params.split,
                             targets=params.targets, roi=params.roi, ceiling=params.ceiling)
    layers = params.layers or [layer.name for layer in FeatureStore.open(params.features, mode="r").layers]
    progress = create_progress_artifact(progress=0.0, key="encode-progress", description="Layers scored")
    layer_task = encode_layer_task.with_options(retries=params.retries, retry_delay_seconds=5)
    parts = []
    for i, layer in enumerate(layers):  # one at a time: the ridge solver already uses the whole device
        parts.append(layer_task(params, neural, layer))
        update_progress_artifact(progress, progress=100.0 * (i + 1) / len(layers))
    scores = xr.concat(parts, dim="layer", combine_attrs="override")
    summary = enc.save_outputs(scores, params.out, overwrite=params.overwrite)
    logger.info("best layer %s; median r per layer %s", summary["best_layer"], summary["layers"])
    table = enc.summary_table(scores)
    create_table_artifact(key="encode-scores", table=table.round(4).astype(object).where(table.notna(), None)
                          .to_dict(orient="records"), description="Median r per layer (and per ROI)")
    with fsspec.open(summary["plot"], "rb") as f:
        png = base64.b64encode(f.read()).decode()
    create_markdown_artifact(
        key="encode-summary",
        markdown=(f"# Encoding scores\n\n- **Scores**: `{params.out}`\n- **Best layer**: `{summary['best_layer']}`\n"
                  f"- **Stimuli**: {summary['n_train']} train, {summary['n_test']} test\n\n"
                  f"![layer-wise scores](data:image/png;base64,{png})\n"),
        description="Layer-wise encoding scores",
    )
    return summary
