"""Start-up of `neuropredictor extract`: seconds from the command to its first image, and to the end.

    python benchmarks/startup.py [--runs 3] [--model torchvision:resnet18]

The corpus's first shard holds one image, so its commit record appears as soon as the first image has
gone through the model and into the store: the time to that record is the time to the first image (plus
one small write). Each case runs `--runs` times in fresh processes, with no Prefect server configured
(PREFECT_API_URL unset, a fresh PREFECT_HOME); the `--prefect` case runs the same as a flow run on Prefect's
temporary local server, for comparison. Then one in-process run timed stage by stage (imports, model,
plan, first image) shows where the time goes. Prints a table and writes benchmarks/results/startup-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def make_corpus(root: Path, images: int = 33) -> Path:
    import numpy as np
    from PIL import Image

    from neuropredictor.corpus import make_shards

    rng = np.random.default_rng(0)
    first, rest = root / "first", root / "rest"
    for folder, n in ((first, 1), (rest, images - 1)):
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(folder / f"{folder.name}{i:03d}.jpg")
    make_shards(first, str(root / "shards"), maxcount=1, prefix="a")  # a-000000.tar: the one image
    make_shards(rest, str(root / "shards"), maxcount=16, prefix="b")
    return root / "shards"


def one_run(corpus: Path, model: str, out: Path, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(out.parent / f"{out.name}-prefect-home")  # fresh: no profile, no server
    cmd = [str(Path(sys.executable).with_name("neuropredictor")), "extract", "--corpus", str(corpus), "--model", model,
           "--layers", "layer4", "--reduce", "avgpool", "--out", str(out), "--no-pretrained", "--batch-size", "16",
           "--num-workers", "1", *extra]
    first_record = out / "_status" / "a-000000.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if first is None and first_record.exists():
            first = time.perf_counter() - t0
        time.sleep(0.01)
    stderr = proc.communicate(timeout=60)[1]
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return {"first_image_s": round(first if first is not None else total, 2), "total_s": round(total, 2)}


_STAGES = """
import json, sys, time
t = [time.perf_counter()]
mark = lambda: t.append(time.perf_counter())
import neuropredictor.cli; mark()                                  # the command line (typer, rich, pydantic)
import torch, torchvision; mark()                                  # torch itself
from neuropredictor import ExtractConfig, pipeline; mark()         # the library's heavy modules
corpus, model, out = sys.argv[1:4]
config = ExtractConfig(corpus=corpus, model=model, layers=["layer4"], reduce="avgpool", out=out,
                       pretrained=False, batch_size=16, num_workers=1)
pipeline.get_runner(config); mark()                                # model built, hooks resolved
shards = pipeline.validate(config); store = pipeline.plan(config, shards); mark()
from neuropredictor.schedule import run
first = []
run(config, on_event=lambda e, d: first.append(time.perf_counter()) if e == "batch" and not first else None)
t.append(first[0]); mark()
names = ["import cli", "import torch", "import library", "load model", "validate + plan", "first image", "rest"]
print(json.dumps({n: round(b - a, 2) for n, a, b in zip(names, t, t[1:])}))
"""


def stages(corpus: Path, model: str, out: Path) -> dict:
    """Where the start-up goes, measured in one fresh process: imports, model, plan, the first image."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.run([sys.executable, "-c", _STAGES, str(corpus), model, str(out)], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="torchvision:resnet18")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="np-startup-"))
    corpus = make_corpus(root)
    cases = {"no server (default)": [], "--prefect (temporary server)": ["--prefect"]}
    results = {}
    for name, extra in cases.items():
        runs = [one_run(corpus, args.model, root / f"{name[:2]}{i}.zarr", extra) for i in range(args.runs)]
        results[name] = {"runs": runs, "first_image_s": statistics.median(r["first_image_s"] for r in runs),
                         "total_s": statistics.median(r["total_s"] for r in runs)}
        print(f"{name:30s} first image {results[name]['first_image_s']:6.2f} s   total {results[name]['total_s']:6.2f} s"
              f"   ({args.runs} runs, median)")
    breakdown = stages(corpus, args.model, root / "stages.zarr")
    print("where the time goes (one process, seconds): " + ", ".join(f"{k} {v}" for k, v in breakdown.items()))
    import platform

    record = {"date": dt.date.today().isoformat(), "model": args.model, "images": 33, "cpus": os.cpu_count(),
              "machine": platform.machine(), "cases": results, "stages_s": breakdown}
    path = HERE / "results" / f"startup-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
