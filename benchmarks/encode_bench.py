"""Time one layer's encoding fit (`neuropredictor.encode.encode_layer`, himalaya, torch backend on the
CPU) against scikit-learn's RidgeCV(alpha_per_target=True) on the same data.

    nice -n 19 python benchmarks/encode_bench.py                       # 10,000 x 10,000 x 4,096
    nice -n 19 python benchmarks/encode_bench.py --n-stimuli 4000 --n-targets 4000 --n-features 2048
    python benchmarks/encode_bench.py --sklearn-n-stimuli 4000 ...    # sklearn (and a himalaya run
                                                                      # for the ratio) at a smaller size

Data: X (stimuli x features) float32 N(0, 1); Y = X[:, :64] @ W + noise (a low-rank planted map, so
scores are meaningful and generating Y is cheap). A random 20 % of the stimuli are held out; both
solvers see the same standardised training features (training mean/std) and the same alpha grid.

What each side does (they are not the same algorithm, and the table says so):
  himalaya   encode_layer: 5-fold inner CV over the grid (float32), refit, predict, score.
  sklearn    RidgeCV(alphas, alpha_per_target=True): efficient leave-one-out (GCV) in float64 --
             scikit-learn allows alpha_per_target only with its closed-form LOO -- then predict and
             the same scoring.

Each solver runs in its own child process, so the peak memory (max RSS) reported is its own.
The last line printed is one JSON object (device, date, sizes, seconds, ratio) for RESULTS.md.
Only measured numbers are printed: a phase that is skipped or fails says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def make_data(n: int, t: int, p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p), dtype=np.float32)
    k = min(64, p)
    W = rng.standard_normal((k, t), dtype=np.float32) / np.sqrt(k)
    noise = np.linspace(0.5, 3.0, t, dtype=np.float32)
    Y = X[:, :k] @ W
    Y += rng.standard_normal((n, t), dtype=np.float32) * noise
    test = np.zeros(n, bool)
    test[rng.permutation(n)[: int(round(0.2 * n))]] = True
    return X, Y, ~test, test


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def phase(args: argparse.Namespace) -> dict:
    """Runs in a child process: one solver at one size; returns its measurements."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    if args.threads:
        torch.set_num_threads(args.threads)
    X, Y, tr, te = make_data(args.n, args.t, args.p, args.seed)
    alphas = np.logspace(-2, 6, 17)
    out = {"solver": args.phase, "n_stimuli": args.n, "n_train": int(tr.sum()), "n_test": int(te.sum()),
           "n_targets": args.t, "n_features": args.p}
    if args.threads:
        threadpool_limits(args.threads)  # a child process: nothing to restore
    if args.phase == "himalaya":
        import himalaya.kernel_ridge  # noqa: F401  imported before the clock starts, like sklearn below
        import himalaya.ridge  # noqa: F401
        import sklearn.model_selection  # noqa: F401

        from neuropredictor.encode import encode_layer

        t0 = time.perf_counter()
        res = encode_layer(X[tr], Y[tr], X[te], Y[te], alphas, 5, device=args.device, dtype="float32")
        out["seconds"] = time.perf_counter() - t0
        out.update(backend=res["backend"], method=f"{res['solver']}, 5-fold inner CV, float32",
                   torch_threads=torch.get_num_threads())
        r = res["r"]
    else:
        from sklearn.linear_model import RidgeCV

        from neuropredictor.encode import pearson_r

        t0 = time.perf_counter()
        mu, sd = X[tr].mean(0), X[tr].std(0)
        Xtr, Xte = (X[tr] - mu) / sd, (X[te] - mu) / sd
        model = RidgeCV(alphas=alphas, alpha_per_target=True, fit_intercept=True).fit(Xtr, Y[tr])
        r = pearson_r(Y[te], model.predict(Xte))
        out["seconds"] = time.perf_counter() - t0
        out.update(backend="numpy", method="RidgeCV GCV leave-one-out, float64",
                   blas_threads=[i.get("num_threads") for i in threadpool_info()])
    out["median_r"] = float(np.nanmedian(r))
    out["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def run_child(args: argparse.Namespace, which: str, n: int, t: int, p: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", which, "--n-stimuli", str(n), "--n-targets", str(t),
           "--n-features", str(p), "--seed", str(args.seed), "--device", args.device,
           "--threads", str(args.threads or 0)]
    print(f"... {which} at {n} x {t} x {p}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"solver": which, "n_stimuli": n, "n_targets": t, "n_features": p, "error": " | ".join(tail),
                "wall": time.perf_counter() - t0}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-stimuli", type=int, default=10_000)
    ap.add_argument("--n-targets", type=int, default=10_000)
    ap.add_argument("--n-features", type=int, default=4096)
    ap.add_argument("--sklearn-n-stimuli", type=int, default=None, help="run sklearn (and himalaya again, "
                    "for the ratio) at this smaller size when the full size would take it too long")
    ap.add_argument("--sklearn-n-targets", type=int, default=None)
    ap.add_argument("--sklearn-n-features", type=int, default=None)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: library default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per phase")
    ap.add_argument("--phase", choices=["himalaya", "sklearn"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.n, args.t, args.p = args.n_stimuli, args.n_targets, args.n_features

    if args.phase:
        args.threads = args.threads or None
        print(json.dumps(phase(args)))
        return

    full = (args.n, args.t, args.p)
    small = (args.sklearn_n_stimuli or args.n, args.sklearn_n_targets or args.t, args.sklearn_n_features or args.p)
    runs = [run_child(args, "himalaya", *full)]
    if not args.skip_sklearn:
        if small != full:
            runs.append(run_child(args, "himalaya", *small))
        runs.append(run_child(args, "sklearn", *small))

    print(f"\n{'solver':<9} {'stimuli':>8} {'targets':>8} {'features':>8} {'seconds':>9} {'max RSS GiB':>11} "
          f"{'median r':>8}  method")
    for r in runs:
        if "error" in r:
            print(f"{r['solver']:<9} {r['n_stimuli']:>8} {r['n_targets']:>8} {r['n_features']:>8}  FAILED: {r['error']}")
            continue
        print(f"{r['solver']:<9} {r['n_stimuli']:>8} {r['n_targets']:>8} {r['n_features']:>8} {r['seconds']:>9.1f} "
              f"{r['max_rss_gib']:>11.2f} {r['median_r']:>8.3f}  {r['method']}")
    same = [r for r in runs if "error" not in r and (r["n_stimuli"], r["n_targets"], r["n_features"]) == small]
    by = {r["solver"]: r for r in same}
    ratio = by["sklearn"]["seconds"] / by["himalaya"]["seconds"] if {"sklearn", "himalaya"} <= set(by) else None
    if ratio is not None:
        print(f"\nsklearn / himalaya time at {small[0]} x {small[1]} x {small[2]}: {ratio:.2f}x")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    record = {
        "benchmark": "encode_layer",
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores" + (f"; himalaya on {gpu_name()}" if args.device != "cpu" else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_end": load,
        "sizes": {"full": list(full), "compare": list(small)},
        "runs": runs,
        "ratio_sklearn_over_himalaya": ratio,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
