"""The README's sweep example, end to end on a CPU: docs/sweep-comparison.png is what it makes.

Four models (random weights: nothing is downloaded) over 200 generated gratings; `neuropredictor sweep`
extracts them, then neural data is planted from two of them (V1 from AlexNet's first stage, IT from
ResNet-18's last), and the same sweep run again with `--neural` skips the extractions, scores every layer
and compares the models. A few minutes on two cores:

    python docs/sweep_example.py [WORKDIR]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from sweep_data import gratings  # noqa: E402  (the sweep tests' stimuli: layers that differ)

from neuropredictor import open_features  # noqa: E402
from neuropredictor.corpus import make_shards  # noqa: E402
from neuropredictor.sweep import slug  # noqa: E402

MODELS = ["torchvision:alexnet", "torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:vit_tiny_patch16_224"]
PLANTED = {"V1": ("torchvision:alexnet", "features.1"), "IT": ("torchvision:resnet18", "layer4")}


def plant(out: Path, path: Path, targets: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data, rois, keys = [], [], None
    for roi, (spec, layer) in PLANTED.items():
        ds = open_features(str(out / f"{slug(spec)}.zarr"))
        x = ds[layer].values.reshape(ds.sizes["stimulus"], -1)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        y = x @ rng.normal(size=(x.shape[1], targets)) / np.sqrt(x.shape[1])
        data.append(y + 0.5 * y.std() * rng.normal(size=y.shape))
        rois += [roi] * targets
        keys = np.array(list(ds["key"].values))
    np.savez(path, data=np.concatenate(data, 1), key=keys, roi=np.array(rois))


def main(work: Path) -> None:
    gratings(work / "stimuli", 200)
    make_shards(work / "stimuli", str(work / "shards"), maxcount=50)
    sweep = [sys.executable, "-m", "neuropredictor", "sweep", "--corpus", str(work / "shards"),
             "--models", ",".join(MODELS), "--layers", "auto", "--reduce", "avgpool", "--out", str(work / "sweep"),
             "--no-pretrained", "--batch-size", "16", "--no-prefect"]
    subprocess.run(sweep, check=True)  # features only
    plant(work / "sweep", work / "neural.npz")
    subprocess.run([*sweep, "--neural", str(work / "neural.npz"), "--permutations", "200"], check=True)
    shutil.copy(work / "sweep" / "comparison.png", REPO / "docs" / "sweep-comparison.png")
    print(f"wrote {REPO / 'docs' / 'sweep-comparison.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sweep-example-")))
