"""`encode`: ridge encoding models from a store's layers to neural data."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from neuropredictor.cli.app import app, console
from neuropredictor.cli.options import ENC, AsJson, enc_option, fail
from neuropredictor.encode.options import EncodeOptions
from neuropredictor.errors import NeuroPredictorError


@app.command()
def encode(
    ctx: typer.Context,
    features: Annotated[str, typer.Argument(help=ENC["features"].description)],
    neural: Annotated[str, typer.Argument(help=ENC["neural"].description)],
    out: Annotated[str, enc_option("out", "--out")],
    keys_file: Annotated[Optional[str], enc_option("keys_file", "--keys")] = ENC["keys_file"].default,
    key_column: Annotated[str, enc_option("key_column", "--key-column")] = ENC["key_column"].default,
    split: Annotated[Optional[str], enc_option("split", "--split")] = ENC["split"].default,
    folds: Annotated[Optional[int], enc_option("folds", "--folds")] = ENC["folds"].default,
    layers: Annotated[Optional[str], enc_option("layers", "--layers")] = ENC["layers"].default,
    alphas: Annotated[Optional[str], enc_option("alphas", "--alphas")] = ENC["alphas"].default,
    test_fraction: Annotated[float, enc_option("test_fraction", "--test-fraction")] = ENC["test_fraction"].default,
    inner_folds: Annotated[int, enc_option("inner_folds", "--inner-folds")] = ENC["inner_folds"].default,
    seed: Annotated[int, enc_option("seed", "--seed")] = ENC["seed"].default,
    permutations: Annotated[int, enc_option("permutations", "--permutations")] = ENC["permutations"].default,
    device: Annotated[str, enc_option("device", "--device")] = ENC["device"].default,
    targets: Annotated[Optional[str], enc_option("targets", "--targets")] = ENC["targets"].default,
    roi: Annotated[Optional[str], enc_option("roi", "--roi")] = ENC["roi"].default,
    ceiling: Annotated[Optional[str], enc_option("ceiling", "--ceiling")] = ENC["ceiling"].default,
    array: Annotated[Optional[str], enc_option("array", "--array")] = ENC["array"].default,
    plot: Annotated[Optional[str], enc_option("plot", "--plot")] = ENC["plot"].default,
    overwrite: Annotated[bool, enc_option("overwrite", "--overwrite")] = ENC["overwrite"].default,
    as_json: AsJson = False,
) -> None:
    """Fit ridge encoding models from every layer to the neural data; print per-layer scores."""
    from pydantic import ValidationError

    from neuropredictor.encode import encode_command
    from neuropredictor.encode.chance import CHANCE_QUANTILE

    try:  # parameters are named as EncodeOptions' fields
        summary = encode_command(EncodeOptions(**{k: v for k, v in ctx.params.items() if k in ENC}))
    except (NeuroPredictorError, ValidationError) as exc:
        fail(exc)
    if as_json:
        print(json.dumps(summary))
        return
    columns = {"all": summary["layers"], **summary["rois"]}
    best = {"all": summary["best_layer"], **summary["best_layer_per_roi"]}
    table = Table(title=f"encoding scores: median r per layer ({summary['split']})")
    for name in ("layer", *columns):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for layer in summary["layers"]:
        table.add_row(layer, *("-" if col[layer] is None else f"{col[layer]:.3f}" + (
            " *" if best[g] == layer else " n.s." if summary["above_chance"][g][layer] is False else "")
            for g, col in columns.items()))
    console.print(table)
    console.print(f"* best layer; n.s.: median r not above chance (the {100 * CHANCE_QUANTILE:.0f}th percentile "
                  f"of its null over {summary['permutations']} permutations of the held-out responses)"
                  if summary["permutations"] else "* best layer, not tested against chance (--permutations 0)",
                  highlight=False)
    for g, layer in best.items():
        console.print(f"best layer, {g}: {layer or 'none above chance'}", highlight=False)
    console.print(f"scores: {summary['scores']}   plot: {summary['plot']}", highlight=False)
