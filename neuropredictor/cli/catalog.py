"""What can be extracted: `models`, `layers`, `shards make` and `shards index`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neuropredictor.cli.app import app, console, err_console, shards_app
from neuropredictor.cli.options import AsJson, Pretrained, Weights, fail
from neuropredictor.errors import NeuroPredictorError


@app.command()
def models(
    pattern: Annotated[Optional[str], typer.Argument(help="Glob filter, e.g. 'resnet*' or '*vit_base*'.")] = None,
    source: Annotated[Optional[str], typer.Option("--source", "-s", help="timm, torchvision, openclip, clip, hf, custom")] = None,
    as_json: AsJson = False,
) -> None:
    """List model specs that can be loaded (hf: only what is in the local cache)."""
    from neuropredictor.models import GRAMMAR, list_models

    try:
        specs = list_models(source, pattern)
    except ValueError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(specs))
        return
    for spec in specs:
        print(spec)
    if not specs:
        err_console.print("no models match.\n" + escape(GRAMMAR))


@app.command()
def layers(
    spec: Annotated[str, typer.Argument(help=escape("Model spec SOURCE:NAME[@TAG], e.g. torchvision:alexnet."))],
    pattern: Annotated[Optional[str], typer.Argument(help="Glob over layer names ('*' within a segment, '**' across).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Only the layers a preset picks (auto: the "
                                                  "model's representative depths, as `--layers auto` extracts).")] = None,
    pretrained: Pretrained = True,
    weights: Weights = None,
    as_json: AsJson = False,
) -> None:
    """Every layer of a model: name, module type, leaf, output shape for one image, parameters."""
    from neuropredictor.layers import describe_layers, filter_layers, preset_layers
    from neuropredictor.models import load_model

    try:
        model = load_model(spec, pretrained=pretrained, weights=weights)
        every = describe_layers(model)
        infos = filter_layers(every, pattern)
        if preset:  # picked among all layers (a preset's rule looks at the whole model), in forward order
            picked = preset_layers(model, every, preset)
            infos = sorted((i for i in infos if i.name in picked), key=lambda i: picked.index(i.name))
    except NeuroPredictorError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"spec": str(model.spec), "input_size": list(model.input_size),
                          "layers": [dataclasses.asdict(i) for i in infos]}))
        return
    table = Table(title=escape(f"{model.spec}  input {tuple(model.input_size)}  weights {model.weights}"))
    for col in ("name", "type", "leaf", "output shape", "params"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for i in infos:
        shape = "x".join(map(str, i.shape)) if i.shape else ("not run" if i.calls == 0 else "?")
        shape += " (H,W,C)" if i.channels_last else ""
        table.add_row(escape(i.name), escape(i.type), "yes" if i.leaf else "", shape, f"{i.params:,}")
    Console(width=max(console.width, 110)).print(table)



@shards_app.command("make")
def shards_make(
    image_dir: Annotated[Path, typer.Argument(help="Folder of images (jpg, png, webp, tif, bmp, gif; nested folders).")],
    out: Annotated[str, typer.Argument(help="Output folder or URL (s3://bucket/prefix) for the tar shards.")],
    maxcount: Annotated[int, typer.Option(help="Samples per shard.")] = 1000,
    prefix: Annotated[str, typer.Option(help="Shard file name prefix.")] = "shard",
    overwrite: Annotated[bool, typer.Option(help="Replace shards of another corpus already in OUT (stores "
                                            "extracted from them can no longer resume).")] = False,
    as_json: AsJson = False,
) -> None:
    """Pack a folder of images into WebDataset shards, with stable keys and an index of counts."""
    from neuropredictor.corpus import make_shards

    skipped: list[tuple[str, str]] = []
    try:
        shards = make_shards(image_dir, out, maxcount=maxcount, prefix=prefix, overwrite=overwrite,
                             on_skip=lambda rel, reason: skipped.append((rel, reason)))
    except NeuroPredictorError as exc:
        fail(exc)
    for rel, reason in skipped:  # nothing is left out without a word
        err_console.print(f"skipped {escape(rel)}: {reason}", highlight=False)
    _print_shards(shards, as_json, "wrote", f"to {out}")


@shards_app.command("index")
def shards_index(
    folder: Annotated[str, typer.Argument(help="Folder or URL (s3://bucket/prefix) of tar shards made by another tool.")],
    as_json: AsJson = False,
) -> None:
    """Index shards made by another tool (img2dataset, webdataset): one scan writes each shard's offsets and
    the folder's index.json, so later runs count without reading the tars and read each shard's bytes once."""
    from neuropredictor.corpus import index_shards

    try:
        shards = index_shards(folder)
    except NeuroPredictorError as exc:
        fail(exc)
    _print_shards(shards, as_json, "indexed", f"in {folder}")


def _print_shards(shards: list, as_json: bool, done: str, where: str) -> None:
    """The shards as JSON (name, url, count), or one line: what was done to how many shards and images, where."""
    if as_json:
        print(json.dumps([{"name": s.name, "url": s.url, "count": s.count} for s in shards]))
    else:
        console.print(f"{done} {len(shards)} shards ({sum(s.count for s in shards)} images) {where}", markup=False)
