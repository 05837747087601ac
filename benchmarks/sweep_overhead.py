"""A sweep's overhead per model versus separate `extract` commands for the same models.

    python benchmarks/sweep_overhead.py [--images 64] [--models SPEC,SPEC,...]

Times one `neuropredictor sweep` process over the models against one `neuropredictor extract` process
per model, one after another, with the same options (`--layers auto --reduce avgpool --no-pretrained`),
no Prefect server (PREFECT_API_URL unset, a fresh PREFECT_HOME) and no neural data (extraction only).
The extract commands run first, then the sweep, each into fresh stores. Prints both totals, their ratio and
the difference per model (negative: the sweep saves that much per model, mostly the Python and torch
start-up each `extract` pays), and writes benchmarks/results/sweep-overhead-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
MODELS = "torchvision:resnet18,torchvision:mobilenet_v3_small,timm:resnet10t"
RUN = ["--layers", "auto", "--reduce", "avgpool", "--no-pretrained", "--batch-size", "16", "--num-workers", "1",
       "--no-prefect"]


def make_corpus(root: Path, images: int) -> Path:
    import numpy as np
    from PIL import Image

    from neuropredictor.corpus import make_shards

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(root / "images" / f"{i:04d}.jpg")
    make_shards(root / "images", str(root / "shards"), maxcount=16)
    return root / "shards"


def timed(args: list[str], env: dict) -> float:
    cmd = [sys.executable, "-m", "neuropredictor", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--models", default=MODELS)
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    root = Path(tempfile.mkdtemp(prefix="np-sweep-overhead-"))
    corpus = make_corpus(root, args.images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(root / "prefect-home")  # fresh: no profile, no server

    extracts = {}
    for i, spec in enumerate(models):
        extracts[spec] = round(timed(["extract", "--corpus", str(corpus), "--model", spec, "--out",
                                      str(root / f"extract-{i}.zarr"), *RUN], env), 2)
        print(f"extract {spec:40s} {extracts[spec]:7.2f} s")
    separate = sum(extracts.values())
    sweep = timed(["sweep", "--corpus", str(corpus), "--models", ",".join(models), "--out", str(root / "sweep"),
                   *RUN], env)
    per_model = (sweep - separate) / len(models)
    print(f"{len(models)} x extract: {separate:7.2f} s   sweep: {sweep:7.2f} s   sweep / extracts = {sweep / separate:.2f}"
          f"   difference per model: {per_model:+.2f} s")
    record = {"date": dt.date.today().isoformat(), "images": args.images, "models": models, "options": RUN,
              "cpus": os.cpu_count(), "machine": platform.machine(), "extract_s": extracts,
              "separate_s": round(separate, 2), "sweep_s": round(sweep, 2), "ratio": round(sweep / separate, 3),
              "difference_per_model_s": round(per_model, 2)}
    path = HERE / "results" / f"sweep-overhead-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
