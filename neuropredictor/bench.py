"""Throughput benchmark: the model's own speed (ceiling) and the real data path (pipeline), side by side.

    ceiling    forward with hooks + on-device reductions, on input tensors already on the device
    pipeline   shards -> decode -> preprocess -> H2D -> forward -> reduce -> D2H -> Zarr, as `extract` runs it
    flow       optional: the same through the Prefect flow, to show the orchestration overhead

Both use the same model, layers, reductions, batch size and precision, in the same process. The ratio
pipeline / ceiling is the efficiency; the per-stage times say what binds when it is low.
"""

from __future__ import annotations

import datetime as dt
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# dense peak TFLOP/s by device name fragment and precision (vendor datasheets), for the achieved fraction
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def _write_image(args: tuple[Path, int, tuple[int, int]]) -> None:
    path, i, (w, h) = args
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 2)) % 256, ((xx + yy) + i * 13) % 256], -1)
    arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def make_corpus(root: Path, images: int, per_shard: int = 256, size: tuple[int, int] = (400, 300)) -> str:
    """JPEGs with smooth structure and noise (sizes typical of stimulus sets), packed into shards; a corpus
    already made in root with as many images is reused (benchmark cases share one)."""
    import json
    from concurrent.futures import ProcessPoolExecutor

    from neuropredictor.corpus import make_shards

    index = root / "shards" / "index.json"
    if index.exists() and json.loads(index.read_text()).get("total") == images:
        return str(root / "shards")
    src = root / "images"
    src.mkdir(parents=True, exist_ok=True)
    jobs = [(src / f"img{i:07d}.jpg", i, size) for i in range(images)]
    with ProcessPoolExecutor() as pool:  # thousands of JPEGs: every core encodes
        list(pool.map(_write_image, jobs, chunksize=64))
    make_shards(src, str(root / "shards"), maxcount=per_shard, overwrite=True)  # the benchmark's own folder
    return str(root / "shards")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flops_per_image(ex, x: torch.Tensor) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            ex(x)
        return counter.get_total_flops() / x.shape[0]
    except Exception:  # some ops have no FLOP formula; the ratio is reported without TFLOP/s then
        return None


def ceiling(config, iters: int = 20, warmup: int = 3) -> dict:
    """Images/s of the hooked forward alone, on device-resident inputs of the model's input size."""
    from neuropredictor.pipeline import get_runner

    runner = get_runner(config)
    ex, device = runner.extractor, runner.device
    x = torch.randn(config.batch_size, *runner.model.input_size, device=device)
    for _ in range(warmup):
        ex(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        ex(x)
    _sync(device)
    seconds = time.perf_counter() - t0
    rate = iters * config.batch_size / seconds
    flops = _flops_per_image(ex, x)  # a whole batch: a compiled replica pads a smaller one to it
    out = {"images_per_s": round(rate, 1), "gflop_per_image": round(flops / 1e9, 3) if flops else None}
    if flops:
        out["tflops"] = round(rate * flops / 1e12, 2)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        peak = next((p[config.precision] for k, p in PEAK_TFLOPS.items() if k in name), None)
        out["peak_fraction"] = round(out["tflops"] / peak, 3) if peak else None
    return out


def pipeline_run(config) -> dict:
    """Images/s of the real path into a fresh store, with the shards' per-stage times summed."""
    from neuropredictor import pipeline

    store = pipeline.plan(config)
    t0 = time.perf_counter()
    records = [pipeline.extract_shard(config, shard, store=store) for shard in store.shards]
    seconds = time.perf_counter() - t0
    store.finalize()
    stages: dict[str, float] = {}
    for r in records:
        for k, v in r["stages"].items():
            stages[k] = round(stages.get(k, 0.0) + v, 3)
    return {"images_per_s": round(store.rows / seconds, 1), "seconds": round(seconds, 2), "stages": stages}


def timed_run(run: Callable[[Any], Any], config) -> dict:
    """Images/s of a whole run (`run(config)`, e.g. the Prefect flow) into a fresh store."""
    t0 = time.perf_counter()
    run(config)
    seconds = time.perf_counter() - t0
    from neuropredictor.store import FeatureStore

    rows = FeatureStore.open(config.out, config.storage_options, mode="r").rows
    return {"images_per_s": round(rows / seconds, 1), "seconds": round(seconds, 2)}


def bottleneck(stages: dict[str, float]) -> str:
    """The stage that took the largest share of the pipeline's time."""
    names = {"input_wait_s": "input (read + decode + preprocess)",
             "device_decode_s": "decode + preprocess on the device", "compute_s": "compute (H2D + forward + reduce)",
             "writer_wait_s": "storage (D2H + Zarr writes)", "flush_s": "storage (final flush)"}
    return names[max(stages, key=stages.get)] if stages else "?"


def run_bench(model: str, layers: list[str], reduce: str = "avgpool", images: int = 512, batch_size: int = 64,
              precision: str = "fp32", device: str = "auto", num_workers: int | None = None, pretrained: bool = False,
              flow: Callable[[Any], Any] | None = None, workdir: str | None = None, early_exit_baseline: bool = False,
              decode: str = "cpu", compile: bool = False, channels_last: bool = False,
              corpus: str | None = None) -> dict:
    """One benchmark case: ceiling and pipeline side by side; returns every field. `flow(config)`, if given,
    is timed too (the orchestration's overhead: the command line passes the Prefect flow). corpus: shards to
    use instead of generating `images` JPEGs (cases of one benchmark share a corpus)."""
    from neuropredictor.config import ExtractConfig
    from neuropredictor.pipeline import get_runner

    root = Path(workdir or tempfile.mkdtemp(prefix="np-bench-"))
    corpus = corpus or make_corpus(root, images, per_shard=min(256, max(16, images // 4)))

    def config(out: str, layer_list=layers, red=reduce) -> ExtractConfig:
        return ExtractConfig(corpus=corpus, model=model, layers=layer_list, reduce=red, out=str(root / out),
                             pretrained=pretrained, batch_size=batch_size, precision=precision, device=device,
                             num_workers=num_workers, decode=decode, compile=compile, channels_last=channels_last)

    cfg = config("pipeline.zarr")
    dev = get_runner(cfg).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    result = {
        "model": model, "layers": layers, "reduce": reduce, "images": images, "batch_size": batch_size,
        "precision": precision, "decode": decode, "compile": compile, "channels_last": channels_last, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "num_workers": cfg.resolved_workers(), "date": dt.date.today().isoformat(),
    }
    result["ceiling"] = ceiling(cfg)
    result["pipeline"] = pipeline_run(cfg)
    result["efficiency"] = round(result["pipeline"]["images_per_s"] / result["ceiling"]["images_per_s"], 3)
    result["bottleneck"] = bottleneck(result["pipeline"]["stages"])
    if early_exit_baseline:  # the same model run to the end: what early exit saves
        full = ceiling(config("unused.zarr", ["output"], "full"))
        result["full_forward_images_per_s"] = full["images_per_s"]
        result["early_exit_speedup"] = round(result["ceiling"]["images_per_s"] / full["images_per_s"], 2)
    if flow is not None:
        result["flow"] = timed_run(flow, config("flow.zarr"))
        result["flow_overhead"] = round(1 - result["flow"]["images_per_s"] / result["pipeline"]["images_per_s"], 3)
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_rss_mb"] = round(usage, 1)
    result["peak_rss_workers_mb"] = round(children, 1)
    result["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None
    return result
