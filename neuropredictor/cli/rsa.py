"""`rsa`: representational similarity of a store's layers to neural data, with a permutation test."""

from __future__ import annotations

import json
import math
from typing import Annotated, Optional

import typer
from rich.table import Table

from neuropredictor.cli.app import app, console
from neuropredictor.cli.options import ENC, Array, AsJson, KeyColumn, KeysFile, Roi, Targets, enc_option, fail
from neuropredictor.errors import NeuroPredictorError


@app.command()
def rsa(
    features: Annotated[str, typer.Argument(help=ENC["features"].description)],
    neural: Annotated[str, typer.Argument(help="Neural data (stimuli x targets), read as `encode` reads it.")],
    layers: Annotated[Optional[list[str]], enc_option("layers", "--layers")] = None,
    keys_file: KeysFile = ENC["keys_file"].default,
    key_column: KeyColumn = ENC["key_column"].default,
    targets: Targets = ENC["targets"].default,
    roi: Roi = ENC["roi"].default,
    array: Array = ENC["array"].default,
    permutations: Annotated[int, typer.Option(
        "--permutations", min=0, help="Permutations of the stimuli of the neural RDM (Mantel test); a layer is "
        "above chance when its p-value, adjusted for the number of layers (Holm), is at most 0.05. 0 skips the "
        "test.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the permutations.")] = 0,
    out: Annotated[Optional[str], typer.Option("--out", help="Save the results as a Zarr store (rho, p per layer "
                                                            "and ROI).")] = None,
    overwrite: Annotated[bool, enc_option("overwrite", "--overwrite")] = False,
    as_json: AsJson = False,
) -> None:
    """RSA: each layer's RDM (1 - Pearson r between stimuli) against the neural RDM, by Spearman rho."""
    from neuropredictor.encode import rsa as run_rsa
    from neuropredictor.encode import rsa_table
    from neuropredictor.encode.chance import CHANCE_QUANTILE
    from neuropredictor.encode.report import check_scores_out, save_scores

    try:
        if out:  # refused now, not after every layer's RDM
            check_scores_out(out, overwrite=overwrite)
        ds = run_rsa(features, neural, ",".join(layers) if layers else None, permutations=permutations, seed=seed,
                     keys_file=keys_file, key_column=key_column, targets=targets, roi=roi, array=array)
        if out:
            save_scores(ds, out, overwrite=overwrite)
    except NeuroPredictorError as exc:
        fail(exc)
    table = rsa_table(ds)
    if as_json:
        records = table.astype(object).where(table.notna(), None).to_dict("records")  # NaN / NA: null
        print(json.dumps({"n_stimuli": int(ds.attrs["n_stimuli"]), "permutations": permutations, "out": out,
                          "layers": records}))
        return
    groups = list(dict.fromkeys(table.roi))
    shown = Table(title=f"RSA: Spearman rho, layer vs neural RDM ({ds.attrs['n_stimuli']} stimuli)")
    for name in ("layer", *groups):
        shown.add_column(name, justify="left" if name == "layer" else "right")
    cells = {(r.roi, r.layer): r for r in table.itertuples()}
    for layer in dict.fromkeys(table.layer):
        row = [cells[(g, layer)] for g in groups]
        shown.add_row(layer, *("-" if math.isnan(r.rho) else f"{r.rho:.3f}" + (
            " *" if r.best else " n.s." if r.above_chance is False else "") for r in row))
    console.print(shown)
    console.print(f"* best layer; n.s.: rho not above chance (p > {1 - CHANCE_QUANTILE:.2f} over {permutations} "
                  "permutations of the stimuli, adjusted by Holm for the layers in each column)" if permutations else
                  "* best layer, not tested against chance (--permutations 0)", highlight=False)
    for g in groups:
        best = table[(table.roi == g) & table.best].layer.tolist()
        console.print(f"best layer, {g}: {best[0] if best else 'none above chance'}", highlight=False)
    if out:
        console.print(f"saved: {out}", highlight=False)
