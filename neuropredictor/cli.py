"""The `neuropredictor` command line. Heavy imports (torch, models) happen inside commands, so
`--help` and start-up stay fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neuropredictor.config import ExtractConfig
from neuropredictor.encode.options import EncodeOptions
from neuropredictor.errors import NeuroPredictorError

app = typer.Typer(
    help="Extract activations of vision models over large image sets, resumably, into Zarr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
shards_app = typer.Typer(help="Make and inspect WebDataset shards.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
console = Console()
err_console = Console(stderr=True)

NoPretrained = Annotated[bool, typer.Option("--no-pretrained", help="Random weights (no download).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help=ExtractConfig.model_fields["weights"].description)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _help(name: str) -> str:
    return ExtractConfig.model_fields[name].description or ""


def _default(name: str) -> Any:
    return ExtractConfig.model_fields[name].default


def _option(name: str, *flags: str, help: str | None = None) -> Any:
    """The option of ExtractConfig field `name`: its flag is the field's name, its help the field's."""
    return typer.Option(*(flags or ("--" + name.replace("_", "-"),)), help=help or _help(name))


# Library messages name parameters (overwrite=True, `out`); on the command line they are flags, named by
# the same rule as the options below (`retry_delay_seconds` and `keys_file` are the exceptions).
_FLAG_ALIASES = {"pretrained=False": "--no-pretrained", "weights=PATH": "--weights PATH", "keys=": "--keys",
                 "retry_delay_seconds": "--retry-delay", "keys_file": "--keys"}


def as_flags(message: str) -> str:
    """message with the parameters it names written as flags (`overwrite=True` -> --overwrite)."""
    import re

    for words, flag in _FLAG_ALIASES.items():
        message = message.replace(words, flag)
    for name in {*ExtractConfig.model_fields, *EncodeOptions.model_fields}:
        flag = "--" + name.replace("_", "-")
        message = re.sub(rf"\b{name}=True\b", flag, message)
        message = re.sub(rf"`{name}`|\b{name}=(?=[\s,.;)]|$)", flag, message)
    return message


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {escape(as_flags(str(exc)))}", highlight=False)
    raise typer.Exit(2)


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
        _fail(exc)
    if as_json:
        print(json.dumps(specs))
        return
    for spec in specs:
        print(spec)
    if not specs:
        err_console.print("no models match.\n" + GRAMMAR)


@app.command()
def layers(
    spec: Annotated[str, typer.Argument(help="Model spec SOURCE:NAME[@TAG], e.g. torchvision:alexnet.")],
    pattern: Annotated[Optional[str], typer.Argument(help="Glob over layer names ('*' within a segment, '**' across).")] = None,
    no_pretrained: NoPretrained = False,
    weights: Weights = None,
    as_json: AsJson = False,
) -> None:
    """Every layer of a model: name, module type, leaf, output shape for one image, parameters."""
    from neuropredictor.layers import describe_layers, filter_layers
    from neuropredictor.models import load_model

    try:
        model = load_model(spec, pretrained=not no_pretrained, weights=weights)
        infos = filter_layers(describe_layers(model), pattern)
    except NeuroPredictorError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps({"spec": str(model.spec), "input_size": list(model.input_size),
                          "layers": [i.as_dict() for i in infos]}))
        return
    table = Table(title=f"{model.spec}  input {tuple(model.input_size)}  weights {model.weights}")
    for col in ("name", "type", "leaf", "output shape", "params"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for i in infos:
        shape = "x".join(map(str, i.shape)) if i.shape else ("not run" if i.calls == 0 else "?")
        table.add_row(i.name, i.type, "yes" if i.leaf else "", shape, f"{i.params:,}")
    Console(width=max(console.width, 110)).print(table)



@shards_app.command("make")
def shards_make(
    image_dir: Annotated[Path, typer.Argument(help="Folder of images (jpg, png, webp; nested folders).")],
    out: Annotated[str, typer.Argument(help="Output folder or URL (s3://bucket/prefix) for the tar shards.")],
    maxcount: Annotated[int, typer.Option(help="Samples per shard.")] = 1000,
    prefix: Annotated[str, typer.Option(help="Shard file name prefix.")] = "shard",
    as_json: AsJson = False,
) -> None:
    """Pack a folder of images into WebDataset shards, with stable keys and an index of counts."""
    from neuropredictor.corpus import make_shards

    try:
        shards = make_shards(image_dir, out, maxcount=maxcount, prefix=prefix)
    except NeuroPredictorError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([{"name": s.name, "url": s.url, "count": s.count} for s in shards]))
        return
    total = sum(s.count for s in shards)
    console.print(f"wrote {len(shards)} shards ({total} images) to {out}")


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8} img/s"), TextColumn("shards {task.fields[shards]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
        disable=not err_console.is_terminal and os.environ.get("NEUROPREDICTOR_PROGRESS") != "1",
    )


def run_with_progress(config, use_prefect: bool | None = None) -> dict:
    """Run an extraction with a rich progress bar; returns the store's manifest.

    With a Prefect server configured (PREFECT_API_URL) or use_prefect=True, the run is the `extract` flow,
    run in this process and reported to that server (UI, artifacts). Otherwise the library runs the same
    shard loop directly (`neuropredictor.run`): same retries, same resume, no server to start."""
    import threading
    import time

    from neuropredictor.store import FeatureStore

    use_prefect = prefect_configured() if use_prefect is None else use_prefect
    # Load the model while Prefect starts up: the flow's validate step finds it in the replica cache.
    if use_prefect:
        threading.Thread(target=_prewarm, args=(config,), daemon=True).start()
    with _progress() as progress:
        task = progress.add_task("extract", total=None, rate="-", shards="-")
        state = {"t0": None, "seen": 0, "shards": 0, "of": 0}

        def listener(event: str, data: dict) -> None:
            if event == "planned":
                state.update(shards=data["committed_shards"], of=data["shards"])
                progress.update(task, total=data["rows"], completed=data["committed_rows"],
                                shards=f"{state['shards']}/{state['of']}")
            elif event == "batch":
                state["t0"] = state["t0"] or time.perf_counter()
                state["seen"] += data["images"]
                rate = state["seen"] / max(time.perf_counter() - state["t0"], 1e-9)
                progress.update(task, advance=data["images"], rate=f"{rate:,.0f}")
            elif event == "shard":
                state["shards"] += 1
                progress.update(task, shards=f"{state['shards']}/{state['of']}")

        try:
            if use_prefect:
                from neuropredictor_flows.extract import PROGRESS, ExtractParameters, extract_flow

                token = PROGRESS.set(listener)
                try:
                    extract_flow(ExtractParameters(**config.model_dump()))
                finally:
                    PROGRESS.reset(token)
            else:
                from neuropredictor.schedule import run

                run(config, on_event=listener)
        finally:
            progress.refresh()
    return FeatureStore.open(config.out, config.storage_options, mode="r").manifest


def _run_flow(config) -> dict:
    from neuropredictor_flows.extract import ExtractParameters, extract_flow

    return extract_flow(ExtractParameters(**config.model_dump()))


def prefect_configured() -> bool:
    """Whether a Prefect server is configured: PREFECT_API_URL in the environment or in the active profile
    (read without importing Prefect, which costs a second of start-up)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return False
    name = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return bool(profiles.get("profiles", {}).get(name, {}).get("PREFECT_API_URL"))


def _prewarm(config) -> None:
    from neuropredictor import pipeline

    try:
        pipeline.get_runner(config)
    except Exception:
        pass  # the flow's validate step loads it again and reports the error properly


@app.command()
def extract(
    corpus: Annotated[str, _option("corpus")],
    model: Annotated[str, _option("model")],
    layers: Annotated[str, _option("layers", help="Comma-separated. " + _help("layers"))],
    out: Annotated[str, _option("out")],
    reduce: Annotated[str, _option("reduce")] = _default("reduce"),
    no_pretrained: NoPretrained = False,
    weights: Weights = None,
    batch_size: Annotated[int, _option("batch_size")] = _default("batch_size"),
    precision: Annotated[str, _option("precision")] = _default("precision"),
    dtype: Annotated[str, _option("dtype")] = _default("dtype"),
    num_workers: Annotated[Optional[int], _option("num_workers")] = _default("num_workers"),
    device: Annotated[str, _option("device")] = _default("device"),
    channels_last: Annotated[bool, _option("channels_last")] = _default("channels_last"),
    decode: Annotated[str, _option("decode")] = _default("decode"),
    compile: Annotated[bool, _option("compile")] = _default("compile"),
    compression: Annotated[str, _option("compression")] = _default("compression"),
    overwrite: Annotated[bool, _option("overwrite")] = _default("overwrite"),
    retries: Annotated[int, _option("retries")] = _default("retries"),
    retry_delay: Annotated[float, _option("retry_delay_seconds", "--retry-delay")] = _default("retry_delay_seconds"),
    prefect: Annotated[Optional[bool], typer.Option(
        "--prefect/--no-prefect", help="Run as a Prefect flow run (UI, artifacts). Default: when a Prefect server "
        "is configured (PREFECT_API_URL).")] = None,
    as_json: AsJson = False,
) -> None:
    """Extract layer activations of one model over a corpus into a Zarr store. Re-running resumes."""
    from pydantic import ValidationError

    from neuropredictor.config import ExtractConfig
    from neuropredictor.layers import split_layers

    try:
        config = ExtractConfig(
            corpus=corpus, model=model, layers=split_layers(layers), out=out, reduce=reduce,
            pretrained=not no_pretrained, weights=str(weights) if weights else None, batch_size=batch_size,
            precision=precision, dtype=dtype, num_workers=num_workers, device=device,
            channels_last=channels_last, decode=decode, compile=compile, compression=compression,
            overwrite=overwrite, retries=retries, retry_delay_seconds=retry_delay,
        )
        manifest = run_with_progress(config, prefect)
    except (NeuroPredictorError, ValidationError) as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(_summary(manifest, out)))
    else:
        _print_summary(_summary(manifest, out))


def _summary(manifest: dict, url: str) -> dict:
    shards = manifest.get("shards", [])
    by_status: dict[str, int] = {}
    for s in shards:
        by_status[s["status"]] = by_status.get(s["status"], 0) + 1
    rows = sum(s.get("count", 0) for s in shards if s.get("status") == "committed")
    secs = sum(s.get("duration_s") or 0 for s in shards if s.get("status") == "committed")
    return {
        "url": url,
        "status": manifest.get("status"),
        "model": manifest.get("config", {}).get("model"),
        "layers": manifest.get("layers", []),
        "rows": manifest.get("rows", {}),
        "shards": {"total": len(shards), **by_status},
        "failed": [{"name": s["name"], "error": s.get("error")} for s in shards if s["status"] == "failed"],
        "bad_samples": manifest.get("bad_samples", []),
        "images_per_s": round(rows / secs, 1) if secs else None,
        "config_hash": manifest.get("config_hash"),
    }


def _print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['url']}  [{summary['status']}]  {summary['model']}")
    for col in ("layer", "shape", "dtype", "reduction"):
        table.add_column(col)
    for layer in summary["layers"]:
        table.add_row(layer["name"], "(N, " + ", ".join(map(str, layer["shape"])) + ")", layer["dtype"], layer["reduction"])
    console.print(table)
    sh, rows = summary["shards"], summary["rows"]
    console.print(
        f"shards: {sh.get('committed', 0)} done, {sh.get('failed', 0)} failed, {sh.get('pending', 0)} pending "
        f"of {sh['total']};  rows: {rows.get('committed', 0)}/{rows.get('total', 0)} written, "
        f"{rows.get('invalid', 0)} invalid;  throughput: {summary['images_per_s'] or '-'} img/s"
    )
    for bad in summary["bad_samples"][:10]:
        console.print(f"  bad sample {bad['key']} ({bad['shard']}): {bad['reason']}", highlight=False)
    if len(summary["bad_samples"]) > 10:
        console.print(f"  ... and {len(summary['bad_samples']) - 10} more (see manifest.json)")
    for f in summary["failed"]:
        console.print(f"  [red]failed[/] {f['name']}: {f['error']}", highlight=False)
    console.print(f"read it: [bold]neuropredictor.open_features({summary['url']!r})[/]  "
                  f"or xarray.open_zarr({summary['url']!r}, group='features')", highlight=False)


@app.command()
def inspect(
    out: Annotated[str, typer.Argument(help="A store written by `neuropredictor extract`.")],
    as_json: AsJson = False,
) -> None:
    """Summarise a store: layers, shapes, shards done/failed/pending, bad samples, throughput."""
    from neuropredictor.store import FeatureStore

    try:
        # not finalized yet (running, or interrupted): statuses come from the commit records
        manifest = FeatureStore.open(out, mode="r").status_manifest()
    except NeuroPredictorError as exc:
        _fail(exc)
    summary = _summary(manifest, out)
    if as_json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's images, shards and store.")] = Path("demo-output"),
    images: Annotated[int, typer.Option(help="How many images to generate.")] = 48,
) -> None:
    """Generate a small image set, shard it, and extract two layers of a small model into local Zarr."""
    import numpy as np
    from PIL import Image

    from neuropredictor.corpus import make_shards

    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        # smooth colour gradients plus noise: cheap, varied, and deterministic
        h, w = 96 + (i % 4) * 16, 128 - (i % 3) * 16
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * (i + 3)) % 256, ((xx + yy) * 2 + i * 10) % 256], -1)
        arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(image_dir / f"stim{i:03d}.jpg", quality=90)
    shards = make_shards(image_dir, str(out / "shards"), maxcount=16)
    console.print(f"made {len(shards)} shards of {images} generated images in {out / 'shards'}")
    store = str(out / "features.zarr")
    config = ExtractConfig(corpus=str(out / "shards"), model="torchvision:resnet18", layers=["layer3", "layer4"],
                           reduce="layer3=pool:2,layer4=avgpool", out=store, pretrained=False, batch_size=16)
    console.print("extracting torchvision:resnet18 (random weights: no download) layers layer3 (pool:2), layer4 (avgpool)"
                  " as a Prefect flow run (a temporary server unless PREFECT_API_URL names one)")
    try:
        manifest = run_with_progress(config, use_prefect=True)
    except NeuroPredictorError as exc:
        _fail(exc)
    _print_summary(_summary(manifest, store))


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", help="Model spec.")] = "torchvision:resnet18",
    layers: Annotated[str, typer.Option("--layers", help="Comma-separated layers.")] = "layer4",
    reduce: Annotated[str, typer.Option("--reduce")] = "avgpool",
    images: Annotated[int, typer.Option("--images", help="Generated JPEGs in the corpus.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    precision: Annotated[str, typer.Option("--precision")] = "fp32",
    device: Annotated[str, typer.Option("--device")] = "auto",
    num_workers: Annotated[Optional[int], typer.Option("--num-workers")] = None,
    flow: Annotated[bool, typer.Option("--flow", help="Also time the Prefect flow (orchestration overhead).")] = False,
    early_exit: Annotated[bool, typer.Option("--early-exit", help="Also time a full forward: early exit's speed-up.")] = False,
    decode: Annotated[str, _option("decode")] = _default("decode"),
    compile: Annotated[bool, _option("compile")] = _default("compile"),
    as_json: AsJson = False,
) -> None:
    """Measure the ceiling (model alone, inputs on the device) and the pipeline side by side."""
    from neuropredictor.bench import run_bench
    from neuropredictor.layers import split_layers

    try:
        result = run_bench(model, split_layers(layers), reduce, images=images, batch_size=batch_size,
                           precision=precision, device=device, num_workers=num_workers,
                           flow=_run_flow if flow else None, early_exit_baseline=early_exit, decode=decode,
                           compile=compile)
    except NeuroPredictorError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{model} {','.join(result['layers'])} ({reduce})  batch {batch_size}  {precision}  "
                        f"decode {decode}{'  compiled' if compile else ''}  {result['device']}")
    for col in ("stage", "images/s", "notes"):
        table.add_column(col)
    c = result["ceiling"]
    table.add_row("ceiling", f"{c['images_per_s']:,.1f}", f"{c.get('tflops') or '-'} TFLOP/s"
                  + (f" ({c['peak_fraction']:.0%} of peak)" if c.get("peak_fraction") else ""))
    p = result["pipeline"]
    table.add_row("pipeline", f"{p['images_per_s']:,.1f}", "stages: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in p["stages"].items()))
    if "flow" in result:
        table.add_row("flow", f"{result['flow']['images_per_s']:,.1f}", f"overhead {result['flow_overhead']:.0%}")
    if "early_exit_speedup" in result:
        table.add_row("full forward", f"{result['full_forward_images_per_s']:,.1f}", f"early exit x{result['early_exit_speedup']}")
    console.print(table)
    console.print(f"efficiency pipeline/ceiling = [bold]{result['efficiency']:.2f}[/]; bottleneck: {result['bottleneck']}; "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB (+ workers {result['peak_rss_workers_mb']:.0f} MB)")


_ENC = EncodeOptions.model_fields  # the CLI's encode options take their defaults and help from here


def _enc(name: str, *flags: str) -> typer.models.OptionInfo:
    return typer.Option(*flags, help=_ENC[name].description)


@app.command()
def encode(
    ctx: typer.Context,
    features: Annotated[str, typer.Argument(help=_ENC["features"].description)],
    neural: Annotated[str, typer.Argument(help=_ENC["neural"].description)],
    out: Annotated[str, _enc("out", "--out")],
    keys_file: Annotated[Optional[str], _enc("keys_file", "--keys")] = _ENC["keys_file"].default,
    key_column: Annotated[str, _enc("key_column", "--key-column")] = _ENC["key_column"].default,
    split: Annotated[Optional[str], _enc("split", "--split")] = _ENC["split"].default,
    folds: Annotated[Optional[int], _enc("folds", "--folds")] = _ENC["folds"].default,
    layers: Annotated[Optional[str], _enc("layers", "--layers")] = _ENC["layers"].default,
    alphas: Annotated[Optional[str], _enc("alphas", "--alphas")] = _ENC["alphas"].default,
    test_fraction: Annotated[float, _enc("test_fraction", "--test-fraction")] = _ENC["test_fraction"].default,
    inner_folds: Annotated[int, _enc("inner_folds", "--inner-folds")] = _ENC["inner_folds"].default,
    seed: Annotated[int, _enc("seed", "--seed")] = _ENC["seed"].default,
    permutations: Annotated[int, _enc("permutations", "--permutations")] = _ENC["permutations"].default,
    device: Annotated[str, _enc("device", "--device")] = _ENC["device"].default,
    targets: Annotated[Optional[str], _enc("targets", "--targets")] = _ENC["targets"].default,
    roi: Annotated[Optional[str], _enc("roi", "--roi")] = _ENC["roi"].default,
    ceiling: Annotated[Optional[str], _enc("ceiling", "--ceiling")] = _ENC["ceiling"].default,
    array: Annotated[Optional[str], _enc("array", "--array")] = _ENC["array"].default,
    plot: Annotated[Optional[str], _enc("plot", "--plot")] = _ENC["plot"].default,
    overwrite: Annotated[bool, _enc("overwrite", "--overwrite")] = _ENC["overwrite"].default,
    as_json: AsJson = False,
) -> None:
    """Fit ridge encoding models from every layer to the neural data; print per-layer scores."""
    from pydantic import ValidationError

    from neuropredictor.encode import encode_command
    from neuropredictor.encode.chance import CHANCE_QUANTILE

    try:  # parameters are named as EncodeOptions' fields
        summary = encode_command(EncodeOptions(**{k: v for k, v in ctx.params.items() if k in _ENC}))
    except (NeuroPredictorError, ValidationError) as exc:
        _fail(exc)
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
