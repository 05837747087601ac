"""Memory stays flat over many models: one replica per device at a time (a sweep, a notebook loop)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import make_images
from neuropredictor.corpus import make_shards

# the biggest first and last: a cache that kept every replica would hold all of them at the end
MODELS = ["torchvision:vgg11", "torchvision:alexnet", "torchvision:vgg13", "torchvision:resnet50",
          f"custom:{Path(__file__).parent / 'custom_models.py'}:cifar_cnn"]

_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from neuropredictor import ExtractConfig, run
    corpus, root, specs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for i, spec in enumerate(specs):
        run(ExtractConfig(corpus=corpus, model=spec, layers=["auto"], reduce="avgpool", out=f"{root}/m{i}.zarr",
                          pretrained=False, batch_size=4, num_workers=0))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)


def _peak_rss_kb(corpus: Path, root: Path, specs: list[str]) -> int:
    root.mkdir()
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(corpus), str(root), json.dumps(specs)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_over_five_models_stays_near_the_largest_single_run(tmp_path):
    make_images(tmp_path / "imgs", 8, nested=False)
    make_shards(tmp_path / "imgs", str(tmp_path / "shards"), maxcount=4)
    single = max(_peak_rss_kb(tmp_path / "shards", tmp_path / f"single{i}", [spec]) for i, spec in enumerate(MODELS[:3]))  # the big ones
    together = _peak_rss_kb(tmp_path / "shards", tmp_path / "together", MODELS)
    assert together <= 1.5 * single, (together, single)
