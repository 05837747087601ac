"""The `encode` flow: the neural data is read and aligned once, one task per layer (with retries) fits
ridge encoding models on those arrays (each layer kept until the end, so a rerun scores only the layers not
finished; a layer that fails does not stop the others), then the scores are assembled, saved, plotted and
summarised.
Thin orchestration over `neuropredictor.encode`; its parameters are the library's `EncodeOptions`."""

from __future__ import annotations

import warnings

from neuropredictor_flows.artifacts import artifact_key, markdown_image
from neuropredictor_flows.paths import refuse_relative_paths
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import Field

from neuropredictor import encode as enc


class EncodeParameters(enc.EncodeOptions):
    """Encoding models of neural data from every extracted layer: what to fit, where scores go."""

    retries: int = Field(1, ge=0, description="Retries of a failed layer task.")


@task(name="encode-layer", task_run_name="{layer}", cache_policy=NO_CACHE)
def encode_layer_task(prepared: enc.Prepared, layer: str, params: EncodeParameters,
                      kept: enc.KeptLayers) -> enc.LayerScores:
    return enc.score_kept(prepared, layer, params, kept)


@flow(name="encode", validate_parameters=True)
def encode_flow(params: EncodeParameters) -> dict:
    """Score every layer of a features store as an encoding model of neural data (Pearson r, R²)."""
    logger = get_run_logger()
    refuse_relative_paths(params)
    enc.check_scores_out(params.out, None, params.overwrite)  # before the fit, not after it
    with warnings.catch_warnings(record=True) as caught:  # the alignment report belongs in the run's log
        warnings.simplefilter("always")
        prepared = enc.prepare(params.features, params.read_neural(), params)
    for w in caught:
        logger.warning(str(w.message))
    progress = create_progress_artifact(progress=0.0, key=artifact_key("encode-progress", params.out),
                                        description="Layers scored")
    layer_task = encode_layer_task.with_options(retries=params.retries, retry_delay_seconds=5)
    kept = enc.kept_layers(params.out, prepared, params)
    tried = 0

    def score(prep: enc.Prepared, layer: str, opts: EncodeParameters, kept: enc.KeptLayers) -> enc.LayerScores:
        nonlocal tried
        try:  # quoted: Prefect need not walk the arrays
            return layer_task(quote(prep), layer, opts, quote(kept))
        finally:
            tried += 1
            update_progress_artifact(progress, progress=100.0 * tried / len(prep.layers))

    # one layer at a time: the ridge solver already uses the whole device
    scores = enc.assemble(prepared, enc.score_layers(prepared, params, kept, score), params)
    summary = enc.save_outputs(scores, params)
    kept.clear()
    logger.info("best layer %s; median r per layer %s", summary["best_layer"], summary["layers"])
    table = enc.summary_table(scores)
    create_table_artifact(key=artifact_key("encode-scores", params.out),
                          table=table.round(4).astype(object).where(table.notna(), None).to_dict(orient="records"),
                          description="Median r per layer (and per ROI)")
    create_markdown_artifact(
        key=artifact_key("encode-summary", params.out),
        markdown=(f"# Encoding scores\n\n- **Scores**: `{params.out}`\n"
                  f"- **Best layer**: `{summary['best_layer'] or 'none above chance'}`\n"
                  f"- **Split**: {summary['split']}\n\n"
                  + markdown_image(summary["plot"], "layer-wise scores")),
        description="Layer-wise encoding scores",
    )
    return summary
