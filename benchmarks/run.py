"""Run the recorded benchmark cases, one subprocess each (clean peak RSS), and write the results.

    python benchmarks/run.py --device cpu       # this machine's cases
    python benchmarks/run.py --device cuda      # the GPU cases (on a machine with one)

Writes benchmarks/results/<device>-<case>.json and a plot of images/s per case (ceiling vs pipeline).
RESULTS.md quotes these files; nothing in it is estimated or copied.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

# name -> CLI arguments of `neuropredictor bench`
CASES = {
    "cpu": {
        "resnet18": ["--model", "torchvision:resnet18", "--layers", "layer4", "--reduce", "avgpool",
                     "--images", "768", "--batch-size", "32", "--precision", "fp32"],
        "resnet18-2x": ["--model", "torchvision:resnet18", "--layers", "layer4", "--reduce", "avgpool",
                        "--images", "1536", "--batch-size", "32", "--precision", "fp32"],
        "resnet50-layer1": ["--model", "torchvision:resnet50", "--layers", "layer1", "--reduce", "avgpool",
                            "--images", "256", "--batch-size", "32", "--early-exit"],
        "resnet18-device-decode": ["--model", "torchvision:resnet18", "--layers", "layer4", "--reduce", "avgpool",
                                   "--images", "768", "--batch-size", "32", "--precision", "fp32",
                                   "--decode", "device"],
        "resnet18-compile": ["--model", "torchvision:resnet18", "--layers", "layer4", "--reduce", "avgpool",
                             "--images", "768", "--batch-size", "32", "--precision", "fp32", "--compile"],
    },
    "cuda": {
        "resnet50": ["--model", "timm:resnet50", "--layers", "layer4,layer3", "--reduce", "layer4=avgpool,layer3=pool:2",
                     "--images", "8192", "--batch-size", "256", "--precision", "bf16", "--flow"],
        "resnet50-2x": ["--model", "timm:resnet50", "--layers", "layer4,layer3", "--reduce", "layer4=avgpool,layer3=pool:2",
                        "--images", "16384", "--batch-size", "256", "--precision", "bf16"],
        "vit_b16": ["--model", "timm:vit_base_patch16_224", "--layers", "blocks.*", "--reduce", "cls",
                    "--images", "8192", "--batch-size", "256", "--precision", "bf16"],
        "clip_b32": ["--model", "openclip:ViT-B-32", "--layers", "transformer.resblocks.*", "--reduce", "cls",
                     "--images", "8192", "--batch-size", "256", "--precision", "bf16"],
        "resnet50-layer1": ["--model", "timm:resnet50", "--layers", "layer1", "--reduce", "avgpool",
                            "--images", "8192", "--batch-size", "256", "--precision", "bf16", "--early-exit"],
        # the fast-path options, against the cases above: which become the defaults is decided from these
        "resnet50-gpu-decode": ["--model", "timm:resnet50", "--layers", "layer4,layer3",
                                "--reduce", "layer4=avgpool,layer3=pool:2", "--images", "8192", "--batch-size", "256",
                                "--precision", "bf16", "--decode", "device"],
        "resnet50-channels-last": ["--model", "timm:resnet50", "--layers", "layer4,layer3",
                                   "--reduce", "layer4=avgpool,layer3=pool:2", "--images", "8192",
                                   "--batch-size", "256", "--precision", "bf16", "--channels-last"],
        "vit_b16-compile": ["--model", "timm:vit_base_patch16_224", "--layers", "blocks.*", "--reduce", "cls",
                            "--images", "8192", "--batch-size", "256", "--precision", "bf16", "--compile"],
    },
}


def run_case(device: str, name: str, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "neuropredictor", "bench", *args, "--device", device, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["case"] = name
    result["command"] = "neuropredictor bench " + " ".join(args) + f" --device {device}"
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in results]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.6))
    ax.bar([i - 0.2 for i in x], [r["ceiling"]["images_per_s"] for r in results], 0.4, label="ceiling (model alone)")
    ax.bar([i + 0.2 for i in x], [r["pipeline"]["images_per_s"] for r in results], 0.4, label="pipeline (shards to Zarr)")
    for i, r in enumerate(results):
        ax.text(i + 0.2, r["pipeline"]["images_per_s"], f"{r['efficiency']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("images / s")
    ax.set_title(f"{results[0]['device']}: ceiling vs pipeline (label: efficiency)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(CASES), default="cpu")
    parser.add_argument("--cases", nargs="*", help="subset of case names")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for name, case_args in CASES[args.device].items():
        if args.cases and name not in args.cases:
            continue
        result = run_case(args.device, name, case_args)
        (RESULTS / f"{args.device}-{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{name}: ceiling {result['ceiling']['images_per_s']} img/s, pipeline {result['pipeline']['images_per_s']} "
              f"img/s, efficiency {result['efficiency']}, bottleneck {result['bottleneck']}, "
              f"peak RSS {result['peak_rss_mb']} MB")
    # the plot shows every recorded case of this device, not only the ones just run
    recorded = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{args.device}-*.json"))]
    recorded = [r for r in recorded if "case" in r and not r["case"].endswith("-2x")]  # not the encode bench
    order = {name: i for i, name in enumerate(CASES[args.device])}
    plot(sorted(recorded, key=lambda r: order.get(r["case"], len(order))), RESULTS / f"{args.device}-throughput.png")


if __name__ == "__main__":
    main()
