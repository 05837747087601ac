"""A CI-sized smoke run of the benchmark harness: every field is produced (ratios are not asserted)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from neuropredictor.cli import app


def test_bench_smoke_produces_every_field(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", "torchvision:resnet18", "--layers", "layer1",
                                      "--images", "24", "--batch-size", "8", "--num-workers", "1", "--early-exit",
                                      "--decode", "device", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["ceiling"]["images_per_s"] > 0 and data["ceiling"]["gflop_per_image"] > 0
    assert data["pipeline"]["images_per_s"] > 0
    assert set(data["pipeline"]["stages"]) == {"input_wait_s", "device_decode_s", "writer_wait_s", "flush_s", "compute_s"}
    assert data["decode"] == "device" and data["pipeline"]["stages"]["device_decode_s"] > 0
    assert data["compile"] is False
    assert 0 < data["efficiency"] == round(data["pipeline"]["images_per_s"] / data["ceiling"]["images_per_s"], 3)
    assert data["bottleneck"] and data["peak_rss_mb"] > 0 and data["peak_gpu_mem_mb"] is None
    assert data["early_exit_speedup"] > 0 and data["full_forward_images_per_s"] > 0
    assert data["num_workers"] == 1 and data["images"] == 24
