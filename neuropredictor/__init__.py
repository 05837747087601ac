"""NeuroPredictor: activations of vision models over large image sets, resumable, in Zarr.

The library imports no Prefect; use it from a notebook:

    import torch
    from neuropredictor import load_model, read_image, Extractor
    model = load_model("timm:resnet50")
    images = torch.stack([model.transform(read_image(p)) for p in paths])
    with Extractor(model, ["layer3", "layer4"], reduce="avgpool") as ex:
        feats = ex(images)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module; imported on first use so `import neuropredictor` (and the CLI) start fast
_EXPORTS = {
    "load_model": "neuropredictor.models",
    "list_models": "neuropredictor.models",
    "parse_spec": "neuropredictor.models",
    "LoadedModel": "neuropredictor.models",
    "describe_layers": "neuropredictor.layers",
    "select_layers": "neuropredictor.layers",
    "Extractor": "neuropredictor.extractor",
    "make_shards": "neuropredictor.corpus",
    "list_shards": "neuropredictor.corpus",
    "index_shards": "neuropredictor.corpus",
    "read_shard": "neuropredictor.corpus",
    "read_image": "neuropredictor.corpus.decode",
    "release_runners": "neuropredictor.pipeline",
    "Shard": "neuropredictor.shard",
    "FeatureStore": "neuropredictor.store",
    "open_features": "neuropredictor.store",
    "ExtractConfig": "neuropredictor.config",
    "plan": "neuropredictor.pipeline",
    "extract_shard": "neuropredictor.pipeline",
    "finalize": "neuropredictor.schedule",
    "run": "neuropredictor.schedule",
}

if TYPE_CHECKING:  # pragma: no cover
    from neuropredictor.corpus import index_shards, list_shards, make_shards, read_shard
    from neuropredictor.corpus.decode import read_image
    from neuropredictor.pipeline import release_runners
    from neuropredictor.shard import Shard
    from neuropredictor.extractor import Extractor
    from neuropredictor.config import ExtractConfig
    from neuropredictor.pipeline import extract_shard, plan
    from neuropredictor.schedule import finalize, run
    from neuropredictor.store import FeatureStore, open_features
    from neuropredictor.layers import describe_layers, select_layers
    from neuropredictor.models import LoadedModel, list_models, load_model, parse_spec

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neuropredictor' has no attribute {name!r}")
