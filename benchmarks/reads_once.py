"""S3 bytes and GET requests of one extraction, by number of DataLoader workers: does every worker count read
the corpus once? Shards on moto's S3 (scale_sim's counting server), the store on local disk, resnet18 with
random weights on the CPU; the rows of `benchmarks/RESULTS.md`, "Reads once".

    python benchmarks/reads_once.py                       # 4 shards of 32 images, 1/2/4/8 workers
    python benchmarks/reads_once.py --workers 1,4 --images 64

Three corpora of the same images: made by `shards make` (offsets sidecars), written by webdataset's TarWriter
(no index: plan counts by reading), and the latter after `shards index`. One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import scale_sim  # noqa: E402  (the counting S3 server)


def _images(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = root / f"img{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    import s3fs
    import webdataset as wds

    from neuropredictor import ExtractConfig, run
    from neuropredictor.corpus import index_shards, make_shards
    from neuropredictor.corpus.listing import forget_counts

    server = scale_sim.Server()
    opts = {"endpoint_url": server.url, "key": "testing", "secret": "testing-secret"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            files = _images(tmp_path / "images", args.images)
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
            fs.mkdir("bench")
            make_shards(tmp_path / "images", "s3://bench/made", maxcount=args.per_shard, storage_options=opts)
            (tmp_path / "foreign").mkdir()
            for i in range(0, len(files), args.per_shard):
                with wds.TarWriter(str(tmp_path / "foreign" / f"part-{i // args.per_shard:05d}.tar")) as sink:
                    for p in files[i:i + args.per_shard]:
                        sink.write({"__key__": p.stem, "jpg": p.read_bytes()})
            fs.put(str(tmp_path / "foreign") + "/", "bench/foreign/", recursive=True)

            def measure(corpus: str, label: str) -> None:
                size = sum(fs.size(p) for p in fs.glob(f"{corpus[5:]}/*.tar"))
                for workers in (int(w) for w in args.workers.split(",")):
                    out = tmp_path / f"{label}-{workers}.zarr"
                    cfg = ExtractConfig(corpus=corpus, model="torchvision:resnet18", layers=["layer4"],
                                        out=str(out), pretrained=False, batch_size=args.batch_size,
                                        num_workers=workers, storage_options=opts)
                    forget_counts()  # each extraction as a process of its own would read
                    server.take()
                    run(cfg)
                    traffic = server.take()
                    print(json.dumps({"corpus": label, "workers": workers, "shard_bytes": size,
                                      "get_bytes": traffic["get_bytes"], "read_x": round(traffic["get_bytes"] / size, 3),
                                      "requests": traffic["requests"]}), flush=True)

            measure("s3://bench/made", "shards-make")
            measure("s3://bench/foreign", "other-tool")
            index_shards("s3://bench/foreign", opts)
            measure("s3://bench/foreign", "other-tool-indexed")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
