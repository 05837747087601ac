"""Scale simulation: what plan, commit, the resume's skip check, finalize and inspect cost for N shards of one
store on S3 (moto's server on 127.0.0.1, in a process of its own), in wall time and S3 requests.

    python benchmarks/scale_sim.py                 # 100 shards
    python benchmarks/scale_sim.py --shards 10000  # the full size

Extraction is replaced by writing each shard's rows (random features) and commit record through the real
store code (`FeatureStore.writer` -> `ShardWriter.write` -> `commit`), from `--workers` threads, as GPU
workers would; everything else is the library's own code path. The S3 server counts every request it
answers (a WSGI layer in front of moto); each stage prints one JSON line:

    {"stage": ..., "shards": N, "seconds": ..., "requests": {"GET": ..., "LIST": ..., ...}, "requests_total": ...,
     "requests_per_shard": ...}

The distributed parent's polling is not simulated: its request rate follows from flows/distributed.py
(one paged `read_flow_runs` request per poll for all running children) and is printed as a computed stage.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

BUCKET = "scale"
LAYER = "layer4"
WIDTH = 16  # features per row: small, the request pattern does not depend on it
COUNTS_PATH = "/__counts__"


# ---------------------------------------------------------------------------------------------
# the S3 server, counting what it answers


def _serve(port: int, latency_s: float = 0.0) -> None:
    """moto's S3 behind a WSGI layer that counts requests by kind and the bytes of object GETs;
    GET /__counts__ returns and resets them. `latency_s` delays every answer, as a round trip to a real
    object store would (moto on 127.0.0.1 answers in well under a millisecond)."""
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = DomainDispatcherApplication(create_backend_app)
    counts: Counter = Counter()
    sent = [0]  # bytes of object GET responses
    flight = [0, 0]  # requests being answered now, the most at once
    lock = threading.Lock()

    def counted(body: Any) -> Any:
        try:
            for chunk in body:
                with lock:
                    sent[0] += len(chunk)
                yield chunk
        finally:
            getattr(body, "close", lambda: None)()

    def app(environ: dict, start_response: Callable) -> Any:
        if environ.get("PATH_INFO") == COUNTS_PATH:
            with lock:
                body = json.dumps({"requests": dict(counts), "get_bytes": sent[0], "max_in_flight": flight[1]}).encode()
                counts.clear()
                sent[0] = flight[1] = 0
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        kind = "LIST" if method == "GET" and "list-type=" in query else method
        with lock:
            counts[kind] += 1
            flight[0] += 1
            flight[1] = max(flight[1], flight[0])
        try:
            if latency_s:
                time.sleep(latency_s)
            body = moto(environ, start_response)
        finally:
            with lock:
                flight[0] -= 1
        return counted(body) if kind == "GET" else body

    make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The counting S3 server in a child process (its own interpreter: the timings are not the client's GIL's)."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(self.port),
                                       "--latency-ms", str(latency_ms)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.take()
                return
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the S3 server did not start") from None
                time.sleep(0.1)

    def take(self) -> dict[str, Any]:
        """Since the last call: {"requests": by kind (GET, LIST, PUT, HEAD, DELETE, POST), "get_bytes": the
        bytes that object GETs returned, "max_in_flight": the most requests answered at once}."""
        with urllib.request.urlopen(self.url + COUNTS_PATH, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# the corpus and the stages


def _tar(name: str, count: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(count):
            data = b"x"
            info = tarfile.TarInfo(f"{name}_{i:03d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _make_corpus(fs: Any, root: str, n: int, rows: int) -> None:
    """n shards of `rows` samples (equal sizes, as `shards make` writes them) and their index.json."""
    from neuropredictor.corpus.make import INDEX_FORMAT, INDEX_NAME

    names = [f"shard-{i:06d}" for i in range(n)]
    blob = {name: _tar(name, rows) for name in names[:1]}[names[0]]  # same bytes for each: setup speed only
    for i in range(0, n, 1000):
        fs.pipe({f"{root}/{name}.tar": blob for name in names[i:i + 1000]})
    index = {"format": INDEX_FORMAT, "shards": [{"name": name, "count": rows} for name in names]}
    fs.pipe_file(f"{root}/{INDEX_NAME}", json.dumps(index).encode())


def _write_shard(store: Any, shard: Any, bad_every: int) -> None:
    """What extract_shard does around the model: the skip check, the rows, the commit record."""
    import numpy as np

    if store.commit_record(shard.name) is not None:  # extract_shard's skip check: one GET
        return
    rng = np.random.default_rng(shard.offset)
    keys = [f"{shard.name}_{i:03d}" for i in range(shard.count)]
    valid = np.ones(shard.count, dtype=bool)
    bad = []
    if bad_every and int(shard.name[-6:]) % bad_every == 0:
        valid[0] = False
        bad = [{"key": keys[0], "reason": "PIL.UnidentifiedImageError: cannot identify image file"}]
    writer = store.writer(shard)
    writer.write(0, keys, valid, {LAYER: rng.standard_normal((shard.count, WIDTH), dtype=np.float32)})
    writer.commit({"attempts": 1, "duration_s": 1.0, "device": "cuda:0", "images_per_s": 100.0,
                   "valid": int(valid.sum()), "bad_samples": bad})


def _polling(children: int) -> dict:
    """The distributed parent's request rate while `children` child runs are running (from the code)."""
    from neuropredictor_flows.distributed import POLL_PAGE, DistributedParameters

    poll_s = DistributedParameters.model_fields["poll_seconds"].default
    per_poll = math.ceil(children / POLL_PAGE)
    return {"stage": "parent-polling", "children": children, "poll_seconds": poll_s, "requests_per_poll": per_poll,
            "requests_per_second": round(per_poll / poll_s, 3), "computed": True}


def simulate(n: int, rows: int = 4, workers: int = 8, bad_every: int = 10, emit: Callable[[dict], None] = print,
             polling_children: int | None = 600, latency_ms: float = 0.0) -> list[dict]:
    """Run every stage for n shards; returns (and emits) one dict per stage."""
    import s3fs

    from neuropredictor import schedule
    from neuropredictor.corpus import list_shards
    from neuropredictor.store import FeatureStore, LayerSpec

    server = Server(latency_ms)
    out: list[dict] = []
    try:
        opts = {"endpoint_url": server.url, "key": "testing", "secret": "testing-secret"}
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
        fs.mkdir(BUCKET)
        _make_corpus(fs, f"{BUCKET}/corpus", n, rows)
        url = f"s3://{BUCKET}/store.zarr"
        server.take()

        def stage(name: str, fn: Callable[[], Any], **extra: Any) -> Any:
            s3fs.S3FileSystem.clear_instance_cache()  # every stage starts as a fresh process would
            t0 = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - t0
            counts = server.take()["requests"]
            total = sum(counts.values())
            line = {"stage": name, "shards": n, "seconds": round(seconds, 3), "requests": counts,
                    "requests_total": total, "requests_per_shard": round(total / n, 3),
                    **({"latency_ms": latency_ms} if latency_ms else {}), **extra}
            out.append(line)
            emit(line)
            return result

        def plan() -> Any:
            shards = list_shards(f"s3://{BUCKET}/corpus", opts)
            store = FeatureStore.create(url, shards, [LayerSpec(LAYER, (WIDTH,), "avgpool")],
                                        {"model": "sim", "layers": [LAYER]}, storage_options=opts)
            store.committed()  # plan's check of committed shards' files (none yet)
            return store

        store = stage("plan", plan)

        def commit() -> None:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda s: _write_shard(store, s, bad_every), store.shards))

        stage("commit", commit, workers=workers)
        stage("resume-skip-check", lambda: schedule.pending_groups(FeatureStore.open(url, opts), store.shards))
        stage("inspect-running", lambda: FeatureStore.open(url, opts, mode="r").status_manifest())
        manifest = stage("finalize", lambda: FeatureStore.open(url, opts).finalize())
        assert manifest["status"] == "complete", manifest["status"]
        size = fs.size(f"{url}/manifest.json")
        server.take()
        out[-1]["manifest_bytes"] = size
        out[-1]["bad_samples"] = len(manifest["bad_samples"])
        emit({"stage": "manifest", "shards": n, "manifest_bytes": size, "bad_samples": len(manifest["bad_samples"])})
        stage("inspect", lambda: FeatureStore.open(url, opts, mode="r").status_manifest())
    finally:
        server.stop()
    if polling_children:
        line = _polling(polling_children)
        out.append(line)
        emit(line)
    return out


def plot(lines: list[dict], path: str) -> None:
    """Log-log plot of each stage's seconds and S3 requests against the number of shards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in dict.fromkeys(line["stage"] for line in lines) if any("seconds" in x for x in lines
                                                                             if x["stage"] == s)]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.5))
    for stage in stages:
        pts = sorted((x["shards"], x["seconds"], x["requests_total"]) for x in lines if x["stage"] == stage)
        n = [p[0] for p in pts]
        ax_t.plot(n, [max(p[1], 1e-3) for p in pts], marker="o", label=stage)
        ax_r.plot(n, [p[2] for p in pts], marker="o", label=stage)
    for ax, what in ((ax_t, "wall time (s)"), (ax_r, "S3 requests")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("shards")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_r.legend(fontsize=8)
    fig.suptitle("Scale simulation on moto S3 (benchmarks/scale_sim.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--rows", type=int, default=4, help="samples per shard")
    p.add_argument("--workers", type=int, default=8, help="threads writing shards at once")
    p.add_argument("--bad-every", type=int, default=10, help="one bad sample in every k-th shard")
    p.add_argument("--children", type=int, default=600, help="child runs for the parent's polling rate")
    p.add_argument("--plot", nargs="+", metavar=("PNG", "JSONL"),
                   help="plot recorded runs (JSON lines files) into PNG instead of simulating")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="delay every S3 answer by this much (a real store's round trip; moto's is ~0)")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.latency_ms / 1000)
        return
    if args.plot:
        lines = [json.loads(x) for f in args.plot[1:] for x in open(f) if x.strip()]
        plot(lines, args.plot[0])
        return
    simulate(args.shards, args.rows, args.workers, args.bad_every,
             emit=lambda line: print(json.dumps(line), flush=True), polling_children=args.children,
             latency_ms=args.latency_ms)


if __name__ == "__main__":
    main()
