"""Data for sweep tests: stimuli whose layers differ, neural data planted from one model's layer, and a
bit-for-bit comparison of two stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from neuropredictor import open_features

CUSTOM = f"custom:{Path(__file__).parent / 'custom_models.py'}:cifar_cnn"


def gratings(root: Path, n: int, seed: int = 0) -> None:
    """Sinusoidal gratings of random frequency, orientation and phase per colour channel: stimuli whose
    layers differ (random-noise images make every layer of a random network look alike)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:64, 0:80]
    for i in range(n):
        f, ph = rng.uniform(0.02, 0.5, 3), rng.uniform(0, 6.3, 3)
        base = np.stack([127 + 120 * np.sin(f[c] * (xx * np.cos(ph[c]) + yy * np.sin(ph[c])) + ph[c])
                         for c in range(3)], -1)
        Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)).save(
            root / f"s{i:03d}.png")


def planted_neural(store: str, layer: str, path: Path, seed: int = 0) -> None:
    """10 targets (ROI V1), a random linear map of `layer`'s features plus noise, keys in the file."""
    ds = open_features(store)
    x = ds[layer].values.reshape(ds.sizes["stimulus"], -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    rng = np.random.default_rng(seed)
    y = x @ rng.normal(size=(x.shape[1], 10)) / np.sqrt(x.shape[1])
    y += 0.3 * y.std() * rng.normal(size=y.shape)
    roi = np.array(["V1"] * 10)
    np.savez(path, data=y, key=np.array(list(ds["key"].values)), roi=roi)


def store_arrays(url: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(url, mode="r")
    out = {f"features/{n}": g[f"features/{n}"][:] for n in g["features"].array_keys()}
    out["keys"] = np.asarray(g["keys"][:].tolist(), dtype=str)
    out["valid"] = g["valid"][:]
    return out


def assert_identical_stores(a: str, b: str) -> None:
    x, y = store_arrays(a), store_arrays(b)
    assert sorted(x) == sorted(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
