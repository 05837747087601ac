"""The summary of a store (after extract, and for inspect): a dict for --json, a table for people."""

from __future__ import annotations

from rich.table import Table

from neuropredictor.cli.app import console
from neuropredictor.cli.logs import log_file


def summarize(manifest: dict, url: str) -> dict:
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


def print_summary(summary: dict) -> None:
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
    if log_file():
        console.print(f"log: {log_file()}", highlight=False)
    console.print(f"read it: [bold]neuropredictor.open_features({summary['url']!r})[/]  "
                  f"or xarray.open_zarr({summary['url']!r}, group='features')", highlight=False)
