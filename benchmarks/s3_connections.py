"""Concurrent reads of many small S3 objects (a store's commit records, as finalize, resume and inspect read
them) with botocore's default pool of 10 connections and with `neuropredictor.fs.S3_CONNECTIONS`, on moto's
S3 (scale_sim's counting server) with a simulated round trip per request.

    python benchmarks/s3_connections.py --latency-ms 10,30,100 --records 2000

One JSON line per (latency, connections): seconds, GETs per second, the most requests in flight at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import scale_sim  # noqa: E402  (the counting S3 server)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", default="10,30,100")
    parser.add_argument("--records", type=int, default=2000)
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from neuropredictor import fs as fsx

    for latency in (float(x) for x in args.latency_ms.split(",")):
        server = scale_sim.Server(latency_ms=latency)
        try:
            opts = {"endpoint_url": server.url, "key": "testing", "secret": "testing-secret"}
            fs, _ = fsx.connect("s3://records", opts, fresh=True)
            fs.mkdir("records")
            paths = [f"records/_status/shard-{i:06d}.json" for i in range(args.records)]
            fs.pipe({p: b'{"kind": "commit"}' for p in paths})
            for pool in (10, fsx.S3_CONNECTIONS):
                fs, _ = fsx.connect("s3://records", {**opts, "config_kwargs": {"max_pool_connections": pool}},
                                    fresh=True)
                server.take()
                t0 = time.perf_counter()
                fs.cat(paths)
                seconds = time.perf_counter() - t0
                print(json.dumps({"latency_ms": latency, "records": args.records, "connections": pool,
                                  "seconds": round(seconds, 2), "gets_per_s": round(args.records / seconds),
                                  "max_in_flight": server.take()["max_in_flight"]}), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
