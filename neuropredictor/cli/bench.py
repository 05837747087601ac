"""`bench`: the model alone (ceiling) against the whole pipeline."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from neuropredictor.cli.app import app, console
from neuropredictor.cli.options import RUN_DEFAULTS, AsJson, fail, option
from neuropredictor.cli.progress import run_flow
from neuropredictor.errors import NeuroPredictorError


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", help="Model spec.")] = "torchvision:resnet18",
    layers: Annotated[list[str], typer.Option("--layers", help="Comma-separated or repeated layers.")] = ["layer4"],
    reduce: Annotated[str, typer.Option("--reduce")] = "avgpool",
    images: Annotated[int, typer.Option("--images", help="Generated JPEGs in the corpus.")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    precision: Annotated[str, typer.Option("--precision")] = "fp32",
    device: Annotated[str, typer.Option("--device")] = "auto",
    num_workers: Annotated[Optional[int], typer.Option("--num-workers")] = None,
    flow: Annotated[bool, typer.Option("--flow", help="Also time the Prefect flow (orchestration overhead).")] = False,
    early_exit: Annotated[bool, typer.Option("--early-exit", help="Also time a full forward: early exit's speed-up.")] = False,
    decode: Annotated[str, option("decode")] = RUN_DEFAULTS.decode,
    compile: Annotated[bool, option("compile")] = RUN_DEFAULTS.compile,
    as_json: AsJson = False,
) -> None:
    """Measure the ceiling (model alone, inputs on the device) and the pipeline side by side, with random
    weights (speed does not depend on them; nothing is downloaded) on a generated corpus."""
    from neuropredictor.bench import run_bench
    from neuropredictor.config import split_commas

    try:
        result = run_bench(model, split_commas(layers), reduce, images=images, batch_size=batch_size,
                           precision=precision, device=device, num_workers=num_workers,
                           flow=run_flow if flow else None, early_exit_baseline=early_exit, decode=decode,
                           compile=compile)
    except NeuroPredictorError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=escape(f"{model} {','.join(result['layers'])} ({reduce})  batch {batch_size}  {precision}  "
                        f"decode {decode}{'  compiled' if compile else ''}  {result['device']}"))
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
