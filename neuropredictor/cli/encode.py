"""`encode`: ridge encoding models from a store's layers to neural data."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from neuropredictor.cli.app import app, console
from neuropredictor.cli.interrupt import interrupted
from neuropredictor.cli.options import (
    ENC,
    Alphas,
    Array,
    AsJson,
    Ceiling,
    Folds,
    Groups,
    InnerFolds,
    KeyColumn,
    KeysFile,
    Permutations,
    Roi,
    Seed,
    Split,
    Targets,
    TestFraction,
    enc_option,
    fail,
)
from neuropredictor.encode.options import EncodeOptions
from neuropredictor.errors import NeuroPredictorError


@app.command()
def encode(
    ctx: typer.Context,
    features: Annotated[str, typer.Argument(help=ENC["features"].description)],
    neural: Annotated[str, typer.Argument(help=ENC["neural"].description)],
    out: Annotated[str, enc_option("out", "--out")],
    keys_file: KeysFile = ENC["keys_file"].default,
    key_column: KeyColumn = ENC["key_column"].default,
    split: Split = ENC["split"].default,
    groups: Groups = ENC["groups"].default,
    folds: Folds = ENC["folds"].default,
    layers: Annotated[Optional[list[str]], enc_option("layers", "--layers")] = ENC["layers"].default,
    alphas: Alphas = ENC["alphas"].default,
    test_fraction: TestFraction = ENC["test_fraction"].default,
    inner_folds: InnerFolds = ENC["inner_folds"].default,
    seed: Seed = ENC["seed"].default,
    permutations: Permutations = ENC["permutations"].default,
    device: Annotated[str, enc_option("device", "--device")] = ENC["device"].default,
    targets: Targets = ENC["targets"].default,
    roi: Roi = ENC["roi"].default,
    ceiling: Ceiling = ENC["ceiling"].default,
    array: Array = ENC["array"].default,
    plot: Annotated[Optional[str], enc_option("plot", "--plot")] = ENC["plot"].default,
    overwrite: Annotated[bool, enc_option("overwrite", "--overwrite")] = ENC["overwrite"].default,
    as_json: AsJson = False,
) -> None:
    """Fit ridge encoding models from every layer to the neural data; print per-layer scores."""
    from pydantic import ValidationError

    from neuropredictor.encode import encode_command
    from neuropredictor.encode.chance import CHANCE_QUANTILE

    params = {k: v for k, v in ctx.params.items() if k in ENC}
    params["layers"] = params["layers"] or None  # not given: Typer's empty list; every layer then
    try:  # parameters are named as EncodeOptions' fields
        summary = encode_command(EncodeOptions(**params))
    except KeyboardInterrupt as exc:
        from neuropredictor.encode.kept import partial_url

        interrupted(exc, f"interrupted: the layers scored so far are kept in {partial_url(out)}/; run the same "
                         "command again to score only the others.")
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
    console.print(f"* best layer; n.s.: median r not above chance (p > {1 - CHANCE_QUANTILE:.2f} against its null "
                  f"over {summary['permutations']} permutations of the held-out responses, adjusted by Holm for the "
                  "layers scored in each column)"
                  if summary["permutations"] else "* best layer, not tested against chance (--permutations 0)",
                  highlight=False)
    for g, layer in best.items():
        console.print(f"best layer, {g}: {layer or 'none above chance'}", highlight=False)
    console.print(f"scores: {summary['scores']}   plot: {summary['plot']}", highlight=False)
