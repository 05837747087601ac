"""Shared fixtures: generated images, and a real S3 API (moto's server) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Prefect's ephemeral server and test harness get time to start on a loaded 2-core machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

MODEL = "torchvision:resnet18"  # the small model the end-to-end tests extract (random weights)


def make_images(root: Path, n: int, size: tuple[int, int] = (40, 32), seed: int = 0, nested: bool = True) -> list[Path]:
    """Write n small random RGB images (jpg, png and webp, some in sub-folders) under root."""
    rng = np.random.default_rng(seed)
    exts = ["jpg", "png", "webp"]
    paths = []
    for i in range(n):
        sub = root / (f"cat{i % 3}" if nested else "")
        sub.mkdir(parents=True, exist_ok=True)
        w, h = size[0] + (i % 5) * 4, size[1] + (i % 3) * 6  # varied sizes exercise resize/crop
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        p = sub / f"img{i:04d}.{exts[i % 3]}"
        Image.fromarray(arr).save(p, quality=95) if exts[i % 3] == "jpg" else Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    make_images(root, 25)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server (SQLite) for flow runs, one for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def scale_sim():
    """benchmarks/scale_sim.py as a module: its S3 server counts requests and bytes (a process of its own)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("scale_sim", Path(__file__).parents[1] / "benchmarks" / "scale_sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_sim"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, for the whole session; tests reset it through its API."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket `test-bucket`; credentials and endpoint in the environment as a user would set them.

    Returns the storage options mapping that points s3fs at the server explicitly.
    """
    import httpx
    import s3fs

    httpx.post(f"{s3_server}/moto-api/reset", timeout=10).raise_for_status()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ENDPOINT_URL_S3": s3_server,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    opts = {"endpoint_url": s3_server, "key": "testing", "secret": "testing-secret"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.mkdir("test-bucket")
    s3fs.S3FileSystem.clear_instance_cache()
    yield opts
    s3fs.S3FileSystem.clear_instance_cache()


def key_files(image_dir: Path) -> dict[str, Path]:
    """Sample key -> image file, by the key rule of `make_shards` (relative path, no extension, dots as _)."""
    files = sorted(p for p in image_dir.rglob("*") if p.is_file())
    return {str(p.relative_to(image_dir).with_suffix("")).replace(".", "_"): p for p in files}


def reference_features(image_files: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    """Independent computation of resnet18 layer2 (pool:2) and layer4 (avgpool): PIL + the model's
    transform + torchvision's modules called by hand, one image at a time, no hooks."""
    import torch
    import torch.nn.functional as F

    from neuropredictor.models import load_model

    model = load_model(MODEL, pretrained=False)
    net = model.module
    out = {}
    with torch.inference_mode():
        for key, path in image_files.items():
            x = model.transform(Image.open(path).convert("RGB")).unsqueeze(0)
            h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            l2 = net.layer2(net.layer1(h))
            l4 = net.layer4(net.layer3(l2))
            out[key] = {"layer2": F.adaptive_avg_pool2d(l2, 2)[0].numpy(), "layer4": l4.mean(dim=(2, 3))[0].numpy()}
    return out


def check_against_reference(ds, image_dir: Path):
    """The store's rows equal the independent computation, row for row, in key order."""
    ref = reference_features(key_files(image_dir))
    keys = list(ds["key"].values)
    assert keys == list(ref)  # row i = i-th sample in shard order = sorted relative paths
    assert bool(ds["valid"].all())
    for layer in ("layer2", "layer4"):
        want = np.stack([ref[k][layer] for k in keys])
        np.testing.assert_allclose(ds[layer].values, want, rtol=1e-4, atol=1e-5)
    return ds
