"""OpenCLIP and OpenAI CLIP: `openclip:ARCH@TAG` and `clip:ARCH`; the image tower is the extracted model.

Layer names are relative to the image tower (`transformer.resblocks.11`, `ln_post`, ...).
"""

from __future__ import annotations

from torch import nn

from neuropredictor.errors import ModelSpecError
from neuropredictor.globs import match_model_names
from neuropredictor.models.base import Transform, pretrained_download, unknown_model
from neuropredictor.models.spec import ModelSpec


def load(spec: ModelSpec, pretrained: bool) -> tuple[nn.Module, Transform, str]:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if spec.name not in open_clip.list_models():
        raise unknown_model(spec.source, "architecture", spec.name, open_clip.list_models(), cutoff=0.4)
    if spec.source == "clip":
        if spec.tag not in (None, "openai"):
            raise ModelSpecError(f"clip: specs use OpenAI's weights only; for other tags write openclip:{spec.name}@{spec.tag}")
        tag = "openai"
    else:
        tag, tags = spec.tag, [t for a, t in open_clip.list_pretrained() if a == spec.name]
        if pretrained and not tag:
            raise ModelSpecError(f"openclip:{spec.name} needs a pretrained tag (@TAG), one of {tags}, or pretrained=False")
        if tag and tag not in tags:
            raise ModelSpecError(f"open_clip has no pretrained tag {tag!r} for {spec.name}; tags: {tags}")
    kwargs = {}
    cfg = get_pretrained_cfg(spec.name, tag) if tag else {}
    if spec.source == "clip" or cfg.get("quick_gelu"):
        # the activation the weights were trained with (OpenAI's, and tags like laion400m_e32): open_clip
        # itself builds GELU for them and only warns
        kwargs["force_quick_gelu"] = True
    if pretrained:
        with pretrained_download(spec):
            model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=tag, **kwargs)
        weights = f"pretrained:{tag}"
    else:
        # a tag's preprocessing (SigLIP's, PE's, DFN's mean, std and resize) without downloading its weights
        kwargs.update({f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if cfg.get(k)})
        with pretrained_download(spec, random_weights=True):  # some text towers come from the hub (NLLB's)
            model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=None, **kwargs)
        weights = "random"
    return model.visual, preprocess, weights


def list_models(pattern: str | None = None, source: str = "openclip") -> list[str]:
    import open_clip

    if source == "clip":
        entries = [f"{a}" for a, t in open_clip.list_pretrained() if t == "openai" and "quickgelu" not in a]
    else:
        entries = [f"{a}@{t}" for a, t in open_clip.list_pretrained()]
    return match_model_names(pattern, entries)
