"""The summary of a store (after extract, and for inspect): a dict for --json, a table for people."""

from __future__ import annotations

from collections import Counter

from rich.markup import escape
from rich.table import Table

from neuropredictor.cli.app import console
from neuropredictor.cli.logs import log_file
from neuropredictor.status import FAILURES_SHOWN, ShardStatus, StoreStatus
from neuropredictor.store.locks import describe


def summarize(manifest: dict, url: str) -> dict:
    """images_per_s: the committed rows over the time their shards took, summed (so per device where several ran
    at once; waits, outages and failed attempts not counted: a run's wall clock can be much longer)."""
    shards = manifest.get("shards", [])
    by_status = Counter(s["status"] for s in shards)
    rows = sum(s.get("count", 0) for s in shards if s.get("status") == ShardStatus.COMMITTED)
    secs = sum(s.get("duration_s") or 0 for s in shards if s.get("status") == ShardStatus.COMMITTED)
    return {
        "url": url,
        "status": manifest.get("status"),
        "model": manifest.get("config", {}).get("model"),
        "layers": manifest.get("layers", []),
        "rows": manifest.get("rows", {}),
        "shards": {"total": len(shards), **by_status},
        "failed": [{"name": s["name"], "error": s.get("error")} for s in shards if s["status"] == ShardStatus.FAILED],
        "bad_samples": manifest.get("bad_samples", []),
        "duplicate_keys": manifest.get("duplicate_keys", {}),
        "images_per_s": round(rows / secs, 1) if secs else None,
        "config_hash": manifest.get("config_hash"),
    }


def print_summary(summary: dict) -> None:
    # dynamic text is escaped: rich would take "[complete]" (or a bracket in a path or an error) for markup
    table = Table(title=escape(f"{summary['url']}  [{summary['status']}]  {summary['model']}"))
    for col in ("layer", "shape", "dtype", "reduction"):
        table.add_column(col)
    for layer in summary["layers"]:
        table.add_row(escape(layer["name"]), "(N, " + ", ".join(map(str, layer["shape"])) + ")", layer["dtype"],
                      escape(layer["reduction"]))
    console.print(table)
    sh, rows = summary["shards"], summary["rows"]
    console.print(
        f"shards: {sh.get('committed', 0)} done, {sh.get('failed', 0)} failed, {sh.get('pending', 0)} pending "
        f"of {sh['total']};  rows: {rows.get('committed', 0)}/{rows.get('total', 0)} written, "
        f"{rows.get('invalid', 0)} invalid;  {summary['images_per_s'] or '-'} img/s per device while extracting"
    )
    if summary["status"] == StoreStatus.PLANNED:
        console.print("not finalized: a run is extracting into it, or was interrupted (the same extract command "
                      "resumes it)", highlight=False)
    for lease in summary.get("extracting", []):  # inspect only: the shards runs hold now
        written = f", {lease['progress']} rows written" if isinstance(lease.get("progress"), int) else ""
        console.print(escape(f"  now {describe(lease)}{written}"), highlight=False)
    for bad in summary["bad_samples"][:10]:
        console.print(escape(f"  bad sample {bad['key']} ({bad['shard']}): {bad['reason']}"), highlight=False)
    if len(summary["bad_samples"]) > 10:
        console.print(f"  ... and {len(summary['bad_samples']) - 10} more (see manifest.json)")
    if rows.get("committed", 0) and rows.get("invalid", 0) == rows.get("committed"):
        console.print("warning: every image written is invalid, so the store holds no features: see why above",
                      style="yellow", highlight=False)
    if dupes := summary["duplicate_keys"]:
        shown = "; ".join(f"{k!r} rows {', '.join(map(str, rows))}" for k, rows in list(dupes["examples"].items())[:3])
        console.print(escape(f"warning: {dupes['count']} key(s) name more than one row ({shown}): the corpus joins "
                             "images of the same relative path; align by row, or give them unique names"),
                      style="yellow", highlight=False)
    for f in summary["failed"][:FAILURES_SHOWN]:
        console.print(f"  [red]failed[/] {escape(f['name'])}: {escape(str(f['error']))}", highlight=False)
    if len(summary["failed"]) > FAILURES_SHOWN:
        console.print(f"  ... and {len(summary['failed']) - FAILURES_SHOWN} more failed (see manifest.json)")
    if log_file():
        console.print(f"log: {escape(str(log_file()))}", highlight=False)
    url = escape(repr(summary["url"]))
    console.print(f"read it: [bold]neuropredictor.open_features({url})[/]  "
                  f"or xarray.open_zarr({url}, group='features')", highlight=False)


def print_damaged(damaged: dict[str, str], metadata: dict[str, str]) -> None:
    """What `inspect --verify` found: nothing, or each damaged zarr metadata file and shard, and what is
    wrong with it."""
    if not damaged and not metadata:
        console.print("verify: every committed shard reads back as written", highlight=False)
        return
    if metadata:
        console.print(f"[bold red]verify: {len(metadata)} damaged zarr metadata file(s)[/] (run the same extract "
                      "command with --verify to write them again from the plan; the rows are kept, and checked "
                      "then)", highlight=False)
        for path, why in sorted(metadata.items()):
            console.print(escape(f"  {path}: {why}"), highlight=False)
    if damaged:
        console.print(f"[bold red]verify: {len(damaged)} damaged shard(s)[/] (run the same extract command with "
                      "--verify to extract exactly them again)", highlight=False)
        for name, why in sorted(damaged.items()):
            console.print(escape(f"  {name}: {why}"), highlight=False)
