"""`extract`, `inspect` and `demo`: writing a store and reading its state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from neuropredictor import fs as fsx
from neuropredictor.cli.app import app, console
from neuropredictor.cli.interrupt import interrupted
from neuropredictor.cli.options import (
    RUN_DEFAULTS,
    AsJson,
    BatchSize,
    ChannelsLast,
    Compile,
    Compression,
    Decode,
    Device,
    DType,
    NumWorkers,
    Overwrite,
    Precision,
    Pretrained,
    Retries,
    RetryDelay,
    UsePrefect,
    Verify,
    Weights,
    fail,
    field_help,
    option,
)
from neuropredictor.cli.progress import run_with_progress
from neuropredictor.cli.summary import print_damaged, print_summary, summarize
from neuropredictor.config import ExtractConfig
from neuropredictor.errors import Interrupted, NeuroPredictorError


@app.command()
def extract(
    ctx: typer.Context,
    corpus: Annotated[list[str], option("corpus", help=field_help("corpus") + " Repeat the option for a list.")],
    model: Annotated[str, option("model")],
    layers: Annotated[list[str], option("layers", help="Comma-separated or repeated. " + field_help("layers"))],
    out: Annotated[str, option("out")],
    reduce: Annotated[str, option("reduce")] = RUN_DEFAULTS.reduce,
    pretrained: Pretrained = RUN_DEFAULTS.pretrained,
    weights: Weights = None,
    batch_size: BatchSize = RUN_DEFAULTS.batch_size,
    precision: Precision = RUN_DEFAULTS.precision,
    dtype: DType = RUN_DEFAULTS.dtype,
    num_workers: NumWorkers = RUN_DEFAULTS.num_workers,
    device: Device = RUN_DEFAULTS.device,
    channels_last: ChannelsLast = RUN_DEFAULTS.channels_last,
    decode: Decode = RUN_DEFAULTS.decode,
    compile: Compile = RUN_DEFAULTS.compile,
    compression: Compression = RUN_DEFAULTS.compression,
    overwrite: Overwrite = RUN_DEFAULTS.overwrite,
    verify: Verify = RUN_DEFAULTS.verify,
    retries: Retries = RUN_DEFAULTS.retries,
    retry_delay_seconds: RetryDelay = RUN_DEFAULTS.retry_delay_seconds,
    prefect: UsePrefect = None,
    as_json: AsJson = False,
) -> None:
    """Extract layer activations of one model over a corpus into a Zarr store. Re-running resumes."""
    from pydantic import ValidationError

    try:
        # every option is named as its ExtractConfig field
        fields = {k: v for k, v in ctx.params.items() if k in ExtractConfig.model_fields}
        config = ExtractConfig(**fields | {"weights": str(weights) if weights else None,
                                           "corpus": corpus[0] if len(corpus) == 1 else corpus})
        manifest = run_with_progress(config, prefect)
    except Interrupted as exc:
        interrupted(exc)
    except (NeuroPredictorError, ValidationError) as exc:
        fail(exc)
    if as_json:
        print(json.dumps(summarize(manifest, out)))
    else:
        print_summary(summarize(manifest, out))


@app.command()
def inspect(
    out: Annotated[str, typer.Argument(help="A store written by `neuropredictor extract`.")],
    verify: Annotated[bool, typer.Option("--verify", help="Also read every committed shard back and compare it "
                                         "with the checksums written with it, and check the zarr metadata; exit "
                                         "code 1 if any is damaged.")] = False,
    as_json: AsJson = False,
) -> None:
    """Summarise a store: layers, shapes, shards done/failed/pending, bad samples, throughput."""
    from neuropredictor.store import FeatureStore

    try:
        store = FeatureStore.open(out, mode="r")
        # not finalized yet (running, or interrupted): statuses come from the commit records
        manifest = store.status_manifest()
        extracting = store.extracting()
        damaged = store.verify() if verify else None
        broken = store.damaged_metadata() if verify else None
    except NeuroPredictorError as exc:
        fail(exc)
    except Exception as exc:  # an endpoint that does not answer: a run retries it, a look at the store says so
        if not fsx.storage_failure(exc):
            raise
        fail(NeuroPredictorError(fsx.unreachable(out, exc, "the store")))
    summary = summarize(manifest, out) | {"extracting": extracting}
    if as_json:
        print(json.dumps(summary if damaged is None else summary | {"damaged": damaged, "damaged_metadata": broken}))
    else:
        print_summary(summary)
        if damaged is not None:
            print_damaged(damaged, broken)
    if damaged or broken:
        raise typer.Exit(1)


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
    shards = make_shards(image_dir, str(out / "shards"), maxcount=16, overwrite=True)  # the demo's own folder
    console.print(f"made {len(shards)} shards of {images} generated images in {out / 'shards'}")
    store = str(out / "features.zarr")
    config = ExtractConfig(corpus=str(out / "shards"), model="torchvision:resnet18", layers=["layer3", "layer4"],
                           reduce="layer3=pool:2,layer4=avgpool", out=store, pretrained=False, batch_size=16)
    console.print("extracting torchvision:resnet18 (random weights: no download) layers layer3 (pool:2), layer4 (avgpool)"
                  " as a Prefect flow run (a temporary server unless PREFECT_API_URL names one)")
    try:
        manifest = run_with_progress(config, use_prefect=True)
    except Interrupted as exc:
        interrupted(exc)
    except NeuroPredictorError as exc:
        fail(exc)
    print_summary(summarize(manifest, store))
