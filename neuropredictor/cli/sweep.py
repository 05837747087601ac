"""`sweep`: many models over one corpus, one store each, scored on the neural data and compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from neuropredictor.cli.app import app, console, err_console
from neuropredictor.cli.options import (
    ENC,
    RUN_DEFAULTS,
    Alphas,
    Array,
    AsJson,
    BatchSize,
    Ceiling,
    ChannelsLast,
    Compile,
    Compression,
    Decode,
    Device,
    DType,
    Folds,
    Groups,
    InnerFolds,
    KeyColumn,
    KeysFile,
    NumWorkers,
    Overwrite,
    Permutations,
    Precision,
    Pretrained,
    Retries,
    RetryDelay,
    Roi,
    Seed,
    Split,
    Targets,
    TestFraction,
    UsePrefect,
    Verify,
    as_flags,
    enc_option,
    fail,
)
from neuropredictor.errors import Interrupted, NeuroPredictorError
from neuropredictor.status import StepStatus
from neuropredictor.sweep.config import EncodeSettings, SweepConfig

SWEEP = SweepConfig.model_fields
_LAYERS = ",".join(SWEEP["layers"].default)


def _option(name: str, *flags: str, help: str | None = None) -> Any:
    return typer.Option(*(flags or ("--" + name.replace("_", "-"),)), help=help or SWEEP[name].description)


@app.command()
def sweep(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Argument(
        help="A sweep file (YAML) with the same fields as the options (corpus, models, layers, reduce, out, "
        "neural, encode: {...}, ...); each entry of `models` is a spec or {spec, layers, reduce, weights, "
        "pretrained, name}. Options given with it override the file.")] = None,
    corpus: Annotated[list[str] | None, _option("corpus", help=SWEEP["corpus"].description
                                                + " Repeat the option for a list.")] = None,
    models: Annotated[list[str] | None, _option("models", help="Comma-separated or repeated model specs, e.g. "
                                                "timm:resnet50,torchvision:alexnet (see `neuropredictor models`).")] = None,
    layers: Annotated[list[str], _option("layers", help="Comma-separated or repeated. "
                                         + (SWEEP["layers"].description or ""))] = [_LAYERS],
    reduce: Annotated[str, _option("reduce")] = SWEEP["reduce"].default,
    out: Annotated[str | None, _option("out")] = None,
    neural: Annotated[str | None, _option("neural")] = None,
    pretrained: Pretrained = RUN_DEFAULTS.pretrained,
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
    keys_file: KeysFile = ENC["keys_file"].default,
    key_column: KeyColumn = ENC["key_column"].default,
    split: Split = ENC["split"].default,
    groups: Groups = ENC["groups"].default,
    folds: Folds = ENC["folds"].default,
    alphas: Alphas = ENC["alphas"].default,
    test_fraction: TestFraction = ENC["test_fraction"].default,
    inner_folds: InnerFolds = ENC["inner_folds"].default,
    seed: Seed = ENC["seed"].default,
    permutations: Permutations = ENC["permutations"].default,
    targets: Targets = ENC["targets"].default,
    roi: Roi = ENC["roi"].default,
    ceiling: Ceiling = ENC["ceiling"].default,
    array: Array = ENC["array"].default,
    encode_device: Annotated[str, enc_option("device", "--encode-device")] = ENC["device"].default,
    prefect: UsePrefect = None,
    as_json: AsJson = False,
) -> None:
    """Extract many models over one corpus (DIR/<slug>.zarr each, as `extract` would), score them on the
    neural data (as `encode` would) and compare them: DIR/comparison.csv and .png. Re-running resumes:
    finished models are skipped. Exit code 1 when a model failed (after the others completed)."""
    from pydantic import ValidationError

    from neuropredictor.cli.interrupt import RESUME_MESSAGE, Stopped, interrupted, interruptible

    try:
        config = _config(ctx, file)
        # Ctrl-C (or kill) stops at once: what a model committed stays, and the next run resumes from there
        with interruptible() as interruption:
            try:
                summary = _run(config, prefect)
            except BaseException as exc:  # whatever the run ended with (Interrupted, Prefect's own wrappers)
                if isinstance(exc, (KeyboardInterrupt, Interrupted)) or interruption.stop.is_set():
                    interrupted(Stopped(RESUME_MESSAGE, interruption.signum))
                raise
    except (NeuroPredictorError, ValidationError) as exc:
        fail(exc)
    report = _report(summary)
    if as_json:
        print(json.dumps(report))
    else:
        _print_report(report)
    if report["failed"]:
        from neuropredictor.sweep import failure_message

        err_console.print(f"[bold red]error:[/] {escape(as_flags(failure_message(summary)))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(1)


def _config(ctx: typer.Context, file: Path | None) -> SweepConfig:
    """The sweep the command line names: the file's fields, with the options given on the command line
    on top (defaults are SweepConfig's, so an option left out never overrides the file)."""
    # by the source's name: Typer ships its own copy of click, whose ParameterSource is another enum
    given = {name: value for name, value in ctx.params.items()
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
    fields: dict[str, Any] = {}
    encode: dict[str, Any] = {}
    # parameters are named as SweepConfig's fields, then as EncodeSettings' with `encode_` before a name
    # both have (`--device` is the extraction's, `--encode-device` the encoding's)
    for name, value in given.items():
        if name == "corpus" and len(value) == 1:
            fields[name] = value[0]
        elif name in SWEEP:
            fields[name] = value
        elif name.removeprefix("encode_") in EncodeSettings.model_fields:
            encode[name.removeprefix("encode_")] = value
    if encode:
        fields["encode"] = encode
    if file is not None:
        return SweepConfig.from_file(file, **fields)
    missing = [f"--{name}" for name in ("corpus", "models", "out") if name not in fields]
    if missing:
        raise NeuroPredictorError(f"missing {', '.join(missing)}: give --corpus, --models and --out, or a sweep "
                                  "file (neuropredictor sweep SWEEP.yaml)")
    return SweepConfig(**fields)


def _run(config: SweepConfig, use_prefect: bool | None) -> dict:
    """Run the sweep with a line per model and a progress bar for the running extraction. With a Prefect
    server configured (PREFECT_API_URL) or --prefect, it is the `extract-sweep` flow, run in this process;
    otherwise the library's loop (`run_sweep`): the same stores, record and comparison."""
    from neuropredictor.cli.logs import prepare_prefect
    from neuropredictor.cli.progress import (
        ProgressListener,
        prefect_configured,
        progress_bar,
    )
    from neuropredictor.sweep import SweepFailed, run_sweep

    use_prefect = prefect_configured() if use_prefect is None else use_prefect
    with progress_bar() as progress:
        state: dict[str, Any] = {"index": 0, "of": len(config.models), "extraction": None, "task": None}

        def say(spec: str, what: str) -> None:
            progress.console.print(f"[{state['index'] + 1}/{state['of']}] {escape(spec)}: {what}", highlight=False,
                                   soft_wrap=True)

        def listener(event: str, data: dict) -> None:
            if event == "model":
                state["index"] = data["index"]
            elif event == "extracting":
                say(data["spec"], "started")
                state["task"] = progress.add_task(data["spec"], total=None, rate="-", shards="-")
                state["extraction"] = ProgressListener(progress, state["task"])
            elif event == "model-done":
                if state["task"] is not None:
                    progress.remove_task(state["task"])
                state.update(task=None, extraction=None)
                say(data["model"], _outcome(data))
            elif state["extraction"] is not None:
                state["extraction"](event, data)

        if not use_prefect:
            return run_sweep(config, on_event=listener)
        prepare_prefect()
        from neuropredictor_flows.extract import PROGRESS
        from neuropredictor_flows.sweep import SweepParameters, extract_sweep_flow

        token = PROGRESS.set(listener)
        try:
            return extract_sweep_flow(SweepParameters(**config.model_dump()))
        except SweepFailed as exc:
            return exc.summary
        finally:
            PROGRESS.reset(token)


def _outcome(entry: dict) -> str:
    """One model's line: how its extraction (and, when the sweep has neural data, its scoring) ended."""
    ext = entry["extract"]
    if ext["status"] == StepStatus.FAILED:
        return f"[red]failed[/]: {escape(as_flags(str(ext.get('error'))))}"
    if ext.get("skipped"):
        line = "skipped: already extracted"
    elif ext.get("rows_now") == 0:  # resumed, and every shard was committed already
        line = f"already extracted ({ext.get('rows', {}).get('committed', '?')} rows; its store checked)"
    else:
        line = f"extracted ({ext.get('rows', {}).get('committed', '?')} rows, {ext.get('images_per_s') or '-'} img/s)"
    enc = entry.get("encode")
    if enc and enc["status"] == StepStatus.FAILED:
        line += f"; [red]scoring failed[/]: {escape(as_flags(str(enc.get('error'))))}"
    elif enc:
        line += "; scores already made" if enc.get("skipped") else "; scored"
    return line


def _report(summary: dict) -> dict:
    """What the sweep did, for --json and the tables: per model its outcome, per ROI the ranking."""
    models = []
    for entry in summary["models"]:
        ext, enc = entry["extract"], entry.get("encode") or {}
        models.append({
            "model": entry["model"], "store": entry["store"], "status": entry["status"],
            "skipped": bool(ext.get("skipped") and enc.get("skipped", True)),  # nothing left to do
            "layers": ext.get("layers", []), "rows": ext.get("rows", {}).get("committed"),
            "images_per_s": ext.get("images_per_s"), "scores": enc.get("scores"),
            "error": ext.get("error") or enc.get("error"),
        })
    comparison = summary.get("comparison") or {}
    ranking = {roi: [{"rank": i + 1, **e} for i, e in enumerate(entries)]
               for roi, entries in comparison.get("ranking", {}).items()}
    return {"out": summary["out"], "models": models, "ranking": ranking, "csv": comparison.get("csv"),
            "plot": comparison.get("plot"), "warning": comparison.get("warning"), "failed": summary["failed"]}


def _print_report(report: dict) -> None:
    table = Table(title=f"sweep {report['out']}")
    for col in ("model", "status", "layers", "rows", "img/s", "store"):
        table.add_column(col, justify="right" if col in ("layers", "rows", "img/s") else "left",
                         overflow="fold")  # specs and URLs are read in full
    for m in report["models"]:
        status = "[red]failed[/]" if m["status"] == StepStatus.FAILED else "skipped" if m["skipped"] else "done"
        table.add_row(m["model"], status, str(len(m["layers"])), str(m["rows"] or "-"), str(m["images_per_s"] or "-"),
                      m["store"])
    console.print(table)
    for roi, entries in report["ranking"].items():
        normalized = any(e["median_r_normalized"] is not None for e in entries)
        ranked = Table(title=f"ROI {roi}: models ranked by their best layer's median r")
        for col in ("rank", "model", "best layer", "median r", *(["r / ceiling"] if normalized else []), "chance"):
            ranked.add_column(col, justify="right" if col in ("rank", "median r", "r / ceiling") else "left",
                              overflow="fold")
        for e in entries:
            chance = {True: "above", False: "[yellow]not above[/]", None: "not tested"}[e["above_chance"]]
            ranked.add_row(str(e["rank"]), e["model"], e["layer"], _r(e["median_r"]),
                           *([_r(e["median_r_normalized"])] if normalized else []), chance)
        console.print(ranked)
    if report["warning"]:
        console.print(f"[yellow]warning:[/] {escape(report['warning'])}", highlight=False)
    if report["csv"]:
        console.print(f"comparison: {report['csv']}   plot: {report['plot']}", highlight=False, soft_wrap=True)


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
