"""The GPU check, one command on a CUDA machine: the GPU-marked tests, then the recorded GPU benchmark cases,
a profiler summary and the encoding benchmark, every raw result written under --out.

    bash benchmarks/gpu_wheels.sh                        # here, once: wheels the GPU machine lacks -> .whl
    # there (carry .whl), in three calls of the device tool (each under its 600 s limit; estimates, not yet
    # measured on a GPU): the tests and the eager cases, the compiled cases and the profile, the encoding
    python3 benchmarks/gpu_check.py --out $OUT --steps tests,cases --cases eager
    python3 benchmarks/gpu_check.py --out $OUT --steps cases,profile --cases compiled
    python3 benchmarks/gpu_check.py --out $OUT --steps encode

The record (gpu-check.json) is written after every case and step, so a call cut off at its limit keeps
what it measured. The next call adds to it with --previous: $OUT starts empty on every call, so copy the
record into an ignored folder here and carry it (`cp .../gpu-check.json .gpu/`, carry [".whl", ".gpu"],
`--previous .gpu/gpu-check.json`); run the cases a call did not reach by name (--cases a,b).

Files (at most eight, flat, as the device tool returns them): gpu-check.json (every result), gpu-check.log
(every command's output), gpu-tests.xml, gpu-throughput.png, nvidia-smi.txt. Cases run one per process, so
peak memory is each case's own. Nothing is estimated: a case that fails is recorded with its error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from run import plot  # benchmarks/run.py: the same ceiling-vs-pipeline chart

ROOT = Path(__file__).resolve().parent.parent
SITE = Path("/tmp/site")

R50 = {"model": "timm:resnet50", "layers": ["layer3", "layer4"], "reduce": "layer3=pool:2,layer4=avgpool",
       "precision": "bf16"}
VIT = {"model": "timm:vit_base_patch16_224", "layers": ["blocks.*"], "reduce": "cls", "precision": "bf16"}
# issue 11's matrix: decode cpu vs device, eager vs compile, channels_last, batch 64/256/512, early exit
CASES = {
    "resnet50-b256": {**R50, "batch_size": 256},
    "resnet50-b256-device-decode": {**R50, "batch_size": 256, "decode": "device"},
    "resnet50-b256-channels-last": {**R50, "batch_size": 256, "channels_last": True},
    "resnet50-b256-compile": {**R50, "batch_size": 256, "compile": True, "channels_last": True},
    "resnet50-b64": {**R50, "batch_size": 64},
    "resnet50-b512": {**R50, "batch_size": 512},
    # shards as `shards make` packs them (1,000 images): every shard starts its decode workers, and its first
    # batch is decoded by one worker; how much of that the readahead of the next shard hides from the device
    "resnet50-b256-shards1000": {**R50, "batch_size": 256, "shard_images": 1000},
    "resnet50-layer1-early-exit": {**R50, "layers": ["layer1"], "reduce": "avgpool", "batch_size": 256,
                                   "early_exit_baseline": True},
    "vit_b16-b256": {**VIT, "batch_size": 256},
    "vit_b16-b256-device-decode": {**VIT, "batch_size": 256, "decode": "device"},
    "vit_b16-b256-compile": {**VIT, "batch_size": 256, "compile": True},
}


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "gpu-check.log", "a") as f:
        f.write(text + "\n")


def sh(out: Path, cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    log(out, f"$ {' '.join(cmd)}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:  # its output comes as bytes, text=True or not
        stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (exc.stdout, exc.stderr))
        log(out, f"timed out after {timeout} s\n{stdout[-4000:]}")
        return subprocess.CompletedProcess(cmd, 124, stdout, stderr)
    log(out, (proc.stdout + proc.stderr)[-8000:] + f"\n(exit {proc.returncode}, {time.perf_counter() - t0:.1f} s)")
    return proc


def environment() -> dict:
    """PYTHONPATH: this checkout first, then the carried wheels (installed once into /tmp/site)."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels and not SITE.exists() and sys.version_info[:2] == (3, 12):  # gpu_wheels.sh fetches for 3.12
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    paths = [str(ROOT)] + ([str(SITE)] if SITE.exists() else []) + [os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": ":".join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}


def run_tests(out: Path, env: dict) -> dict:
    files = ["tests/test_extractor.py", "tests/test_device_decode.py", "tests/test_encode.py"]
    proc = sh(out, [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
                    "--junitxml", str(out / "gpu-tests.xml"), *files], timeout=420, env=env)
    return {"exit_code": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


_CASE = """
import json, sys
from neuropredictor.bench import run_bench
args = json.loads(sys.argv[1])
print(json.dumps(run_bench(**args)))
"""


def run_cases(out: Path, env: dict, names: list[str], images: int, device: str,
              save: Callable[[str, dict], None]) -> None:
    sys.path[:0] = [p for p in env["PYTHONPATH"].split(":") if p]
    from neuropredictor.bench import make_corpus

    work = Path(tempfile.mkdtemp(prefix="np-gpu-"))
    corpora: dict[int, str] = {}
    for name in names:
        args = dict(CASES[name])
        # shards of 16 batches of the largest size, unless the case says: each batch has its own decode worker
        per_shard = args.pop("shard_images", max(int(CASES[n]["batch_size"]) for n in names) * 16)
        if per_shard not in corpora:
            t0 = time.perf_counter()
            corpora[per_shard] = make_corpus(work / f"corpus-{per_shard}", images, per_shard=per_shard)
            log(out, f"corpus: {images} JPEGs 400x300, {per_shard} per shard, in {time.perf_counter() - t0:.1f} s")
        args.update(images=images, device=device, corpus=corpora[per_shard], workdir=str(work / name))
        proc = sh(out, [sys.executable, "-c", _CASE, json.dumps(args)], timeout=300, env=env)
        try:
            save(name, {**json.loads(proc.stdout.strip().splitlines()[-1]), "shard_images": per_shard})
        except (IndexError, ValueError):
            save(name, {"error": (proc.stderr or proc.stdout)[-2000:]})


_PROFILE = """
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
from neuropredictor import ExtractConfig, plan, extract_shard
cfg = ExtractConfig(**json.loads(sys.argv[1]))
store = plan(cfg)
extract_shard(cfg, store.shards[0], store=store)  # warm: workers, allocator, first-call kernels
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    extract_shard(cfg, store.shards[1], store=store)
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
"""


def run_profile(out: Path, env: dict, corpus: str, device: str) -> dict:
    cfg = {**CASES["resnet50-b256"], "corpus": corpus, "pretrained": False,
           "out": tempfile.mkdtemp(prefix="np-prof-") + "/p.zarr", "device": device}
    proc = sh(out, [sys.executable, "-c", _PROFILE, json.dumps(cfg)], timeout=300, env=env)
    return {"exit_code": proc.returncode}


def run_encode(out: Path, env: dict, device: str) -> dict:
    proc = sh(out, [sys.executable, "benchmarks/encode_bench.py", "--device", device, "--skip-sklearn",
                    *(["--n-stimuli", "500", "--n-targets", "200", "--n-features", "256"] if device == "cpu" else [])],
              timeout=540, env=env)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": proc.stderr[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or f"benchmarks/results/gpu-{dt.date.today()}")
    parser.add_argument("--steps", default="tests,cases,profile,encode")
    parser.add_argument("--cases", default=",".join(CASES), help="names, or eager / compiled")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself")
    parser.add_argument("--previous", help="an earlier call's gpu-check.json: its results are kept in this record")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    env = environment()
    record_path = out / "gpu-check.json"
    earlier = record_path if record_path.exists() else Path(args.previous) if args.previous else None
    record = json.loads(earlier.read_text()) if earlier else {}
    record.update(date=dt.date.today().isoformat(), commit=subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or None)
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
    except FileNotFoundError:
        log(out, "nvidia-smi: not found (no NVIDIA driver here)")

    def save() -> None:  # after every case and step: a call cut off at its time limit keeps what it measured
        record_path.write_text(json.dumps(record, indent=1) + "\n")

    def save_case(name: str, result: dict) -> None:
        record.setdefault("cases", {})[name] = result
        save()

    if "tests" in steps:
        record["tests"] = run_tests(out, env)
        save()
    if "cases" in steps:
        groups = {"eager": [n for n in CASES if not CASES[n].get("compile")],
                  "compiled": [n for n in CASES if CASES[n].get("compile")]}
        names = groups.get(args.cases) or args.cases.split(",")
        run_cases(out, env, names, args.images, args.device, save_case)
        measured = [{"case": name, **r} for name, r in record["cases"].items() if "pipeline" in r]
        if measured:
            plot(measured, out / "gpu-throughput.png")
    if "profile" in steps:
        sys.path[:0] = [p for p in env["PYTHONPATH"].split(":") if p]
        from neuropredictor.bench import make_corpus

        record["profile"] = run_profile(out, env, make_corpus(Path(tempfile.mkdtemp()), 1024), args.device)
        save()
    if "encode" in steps:
        record["encode"] = run_encode(out, env, args.device)
        save()
    log(out, f"wrote {record_path}")


if __name__ == "__main__":
    main()
