"""One entry point for models of every source: `load_model("timm:resnet50", pretrained=False)`."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from neuropredictor.models.base import (CODE, STATE_DIGEST, UNTRAINED, LoadedModel, load_weights_file, state_digest,
                                       transform_output_size)
from neuropredictor.models.spec import GRAMMAR, SOURCES, ModelSpec, parse_spec

RANDOM_SEED = 0

# source -> module implementing load(spec, pretrained) and list_models(pattern); imported on first use
_LOADERS = {
    "timm": "neuropredictor.models.timm",
    "torchvision": "neuropredictor.models.torchvision",
    "openclip": "neuropredictor.models.openclip",
    "clip": "neuropredictor.models.openclip",
    "hf": "neuropredictor.models.hf",
    "custom": "neuropredictor.models.custom",
}

__all__ = ["GRAMMAR", "SOURCES", "LoadedModel", "ModelSpec", "list_models", "load_model", "parse_spec"]


def load_model(spec: str | ModelSpec, pretrained: bool = True, weights: str | Path | None = None) -> LoadedModel:
    """Build the model a spec names, in eval mode on the CPU, with its evaluation preprocessing.

    pretrained: download (or take from the cache) the source's pretrained weights.
    weights: a local checkpoint to load instead (safetensors or torch state dict; implies pretrained=False).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    loader = importlib.import_module(_LOADERS[spec.source])
    # Random weights come from a fixed seed, without touching the caller's RNG: every process (a resumed
    # run, another GPU) builds the same "random" model, so their rows belong to one model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        module, transform, weights_id = loader.load(spec, pretrained=pretrained and weights is None)
    if weights_id == "random":
        weights_id = f"random:seed{RANDOM_SEED}"
    if weights is not None:
        weights_id = load_weights_file(module, weights)
    elif weights_id == STATE_DIGEST:  # weights only their values name (see models.custom)
        weights_id = state_digest(module)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedModel(spec=spec, module=module, transform=transform, input_size=transform_output_size(transform),
                       weights=weights_id, untrained=() if weights is not None else getattr(module, UNTRAINED, ()),
                       code=getattr(module, CODE, None))


def list_models(source: str | None = None, pattern: str | None = None) -> list[str]:
    """Specs that can be loaded, as `SOURCE:NAME[@TAG]` strings (hf: only what is in the local cache). The
    pattern may name its source as a spec does: `timm:resnet*`."""
    prefix, sep, rest = (pattern or "").partition(":")
    if sep and source is None and prefix in SOURCES:
        source, pattern = prefix, rest or None
    out = []
    for src in [source] if source else SOURCES:
        if src not in _LOADERS:
            raise ValueError(f"unknown source {src!r}; sources are {', '.join(SOURCES)}")
        loader = importlib.import_module(_LOADERS[src])
        names = loader.list_models(pattern, source=src) if src in ("clip", "openclip") else loader.list_models(pattern)
        out += [f"{src}:{n}" for n in names]
    return out
