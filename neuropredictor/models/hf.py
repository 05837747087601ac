"""Hugging Face vision models: `hf:ORG/NAME` (hub id, from the cache or downloaded) or `hf:/local/dir`.

Dual-tower models (CLIP, SigLIP, ...) and vision wrappers are reduced to their image tower (`vision_model`,
unwrapped as deep as it goes); layer names are relative to it (`encoder.layers.3`, `post_layernorm`, `head`). Needs the `hf` extra (transformers).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuropredictor.errors import ModelSpecError, WeightsUnavailableError, first_line
from neuropredictor.globs import match_model_names
from neuropredictor.models.base import UNTRAINED, Transform, pretrained_download, weights_digest
from neuropredictor.models.spec import ModelSpec

log = logging.getLogger(__name__)

_PIL_TO_V2 = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ModelSpecError("hf: models need transformers: pip install 'neuropredictor[hf]'") from exc
    return transformers


def load(spec: ModelSpec, pretrained: bool) -> tuple[nn.Module, Transform, str]:
    transformers = _import_transformers()
    revision = {"revision": spec.tag} if spec.tag else {}
    with pretrained_download(spec, random_weights=not pretrained):
        try:
            config = transformers.AutoConfig.from_pretrained(spec.name, **revision)
            processor = transformers.AutoImageProcessor.from_pretrained(spec.name, **revision)
        except (OSError, ValueError) as exc:
            if type(exc).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline" in str(exc).lower():
                raise
            raise ModelSpecError(f"hf:{spec.name}: cannot read its config / image processor: {exc}") from exc
        missing: list[str] = []
        if pretrained:
            try:
                model, info = transformers.AutoModel.from_pretrained(spec.name, output_loading_info=True, **revision)
                missing = sorted(info.get("missing_keys") or ())
            except pickle.UnpicklingError as exc:
                raise WeightsUnavailableError(_pickle_refused(spec, exc)) from exc
            weights = _local_weights(spec.name) or f"pretrained:{getattr(config, '_commit_hash', None) or spec.tag or 'main'}"
        else:
            model = transformers.AutoModel.from_config(config)
            weights = "random"
    # CLIPModel -> CLIPVisionModel -> CLIPVisionTransformer: names relative to the innermost image tower
    while isinstance(getattr(model, "vision_model", None), nn.Module):
        model = model.vision_model
        missing = [k.removeprefix("vision_model.") for k in missing if k.startswith("vision_model.")]
    untrained = sorted({k.rpartition(".")[0] for k in missing} - {""})
    if untrained:
        log.warning("hf:%s: the checkpoint has no weights for %s (initialised at random): their outputs are not "
                    "extracted", spec.name, ", ".join(untrained))
    setattr(model, UNTRAINED, tuple(untrained))
    # transformers 5 builds a model in its checkpoint's dtype (bf16 for many): the forward pass runs in the
    # precision asked for (autocast), from float32 weights, as with every other source
    return model.float(), checked_transform(processor), weights


def checked_transform(processor: Any) -> Transform:
    """processor_transform(processor) where it gives what the processor itself gives on a probe image
    (non-square noise: a crop one pixel off or a missed step shows); else the processor, called per image
    (slower, and not for decode="device"), for families whose steps are not those read here."""
    from PIL import Image

    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (301, 419, 3), dtype=np.uint8))
    try:
        fast = processor_transform(processor)
        got, want = fast(probe), _ProcessorCall(processor)(probe)
        if got.shape == want.shape and (got - want).abs().mean().item() <= 0.02 / _min_std(processor):
            return fast
        why = "its output differs on a probe image"
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
    log.info("%s: its steps are not read as tensor ops (%s); the processor itself runs on each image",
             type(processor).__name__, why)
    return _ProcessorCall(processor)


def _min_std(processor: Any) -> float:
    std = getattr(processor, "image_std", None) if getattr(processor, "do_normalize", True) else None
    return min(float(v) for v in np.atleast_1d(std)) if std is not None else 1.0


class _ProcessorCall:
    """The image processor itself on one PIL image: (C, H, W) float32."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, img: Any) -> torch.Tensor:
        out = self.processor(images=img, return_tensors="np")["pixel_values"][0]
        return torch.as_tensor(np.asarray(out, dtype=np.float32))


def _local_weights(name: str) -> str | None:
    """A local model folder's weights by their content (a folder has no commit hash: weights saved into it
    again are other weights), or None for a hub repository."""
    folder = Path(name)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{weights_digest(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def _pickle_refused(spec: ModelSpec, exc: Exception) -> str:
    """Why a pickled checkpoint (.bin) was not loaded, and what to do: its reason, not torch's long advice."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    reason = f"it holds {found.group(1)}, not only tensors" if found else first_line(exc, 200)
    return (f"hf:{spec.name}: its weights are a pickle (.bin) that cannot be loaded safely ({reason}). "
            "NeuroPredictor never runs code from a checkpoint: use a revision that has model.safetensors, "
            "convert the checkpoint to safetensors where you trust it, or pass weights=PATH to a state dict "
            "of tensors.")


def processor_transform(processor) -> Transform:
    """A torchvision transform with the image processor's eval settings (resize, crop, rescale, normalise).

    Built from the processor's attributes instead of calling the processor per image, so it is cheap and
    picklable for DataLoader workers.
    """
    from torchvision.transforms import v2

    size = dict(getattr(processor, "size", None) or {})
    resample = getattr(processor, "resample", 3)
    interp_name = _PIL_TO_V2.get(int(resample), "BICUBIC") if not hasattr(resample, "name") else resample.name
    interp = getattr(v2.InterpolationMode, interp_name, v2.InterpolationMode.BICUBIC)
    steps: list = []
    family = type(processor).__name__
    if getattr(processor, "do_resize", True) and size:
        if "height" in size and "width" in size:
            steps.append(v2.Resize((size["height"], size["width"]), interpolation=interp, antialias=True))
        elif "shortest_edge" in size:
            edge = size["shortest_edge"]
            crop_pct = getattr(processor, "crop_pct", None)
            if family.startswith("ConvNext") and edge >= 384:  # ConvNeXt warps to the square from 384 px
                steps.append(v2.Resize((edge, edge), interpolation=interp, antialias=True))
            elif crop_pct and edge < 384:  # ConvNeXt-style: resize up by 1/crop_pct, then crop to `edge`
                steps += [v2.Resize(int(edge / crop_pct), interpolation=interp, antialias=True),
                          _CenterCrop((edge, edge))]
            else:  # LeViT resizes by 256/224 of the edge before its crop
                scale = 256 / 224 if family.startswith("Levit") else 1
                steps.append(v2.Resize(int(scale * edge), interpolation=interp, antialias=True))
    crop = dict(getattr(processor, "crop_size", None) or {})
    if getattr(processor, "do_center_crop", False) and crop:
        steps.append(_CenterCrop((crop["height"], crop["width"])))
    steps.append(v2.PILToTensor())
    steps.append(v2.ToDtype(torch.float32, scale=False))
    if getattr(processor, "do_rescale", True):  # EfficientNet's rescale_offset: to [-1, 1]
        steps.append(_Rescale(float(getattr(processor, "rescale_factor", 1 / 255)),
                               -1.0 if getattr(processor, "rescale_offset", False) else 0.0))
    if getattr(processor, "do_normalize", True):
        steps.append(v2.Normalize(mean=list(processor.image_mean), std=list(processor.image_std)))
    if getattr(processor, "include_top", False):  # EfficientNet divides by the std a second time
        steps.append(v2.Normalize(mean=[0.0] * len(processor.image_std), std=list(processor.image_std)))
    if getattr(processor, "do_flip_channel_order", False):  # MobileViT's weights take BGR
        steps.append(_FlipChannels())
    return v2.Compose(steps)


# The steps below are classes, not lambdas, so they pickle (DataLoader workers). They work on tensors as
# they are, so decode="device" runs them unchanged (`tensor_ready`).


class _CenterCrop:
    """Hugging Face's centre crop: its offset is rounded down (torchvision's CenterCrop rounds to the
    nearest, one pixel off where the margin is odd), an image smaller than the crop is padded with black."""

    tensor_ready = True

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, img: Any) -> Any:
        (ch, cw), (h, w) = self.size, (img.shape[-2:] if isinstance(img, torch.Tensor) else img.size[::-1])
        top, left = int((h - ch) / 2), int((w - cw) / 2)  # towards zero: HF's padding puts the odd pixel last
        if isinstance(img, torch.Tensor):
            from torchvision.transforms.v2 import functional as F

            return F.crop(img, top, left, ch, cw)
        return img.crop((left, top, left + cw, top + ch))


class _FlipChannels:
    """RGB -> BGR."""

    tensor_ready = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-3)


class _Rescale:
    """Multiply by the processor's rescale factor, then add its offset."""

    tensor_ready = True

    def __init__(self, factor: float, offset: float = 0.0) -> None:
        self.factor, self.offset = factor, offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor + self.offset if self.offset else x * self.factor


def list_models(pattern: str | None = None) -> list[str]:
    """Models already in the local Hugging Face cache (the hub itself is not searched)."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = [r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model"]
    except Exception:
        return []
    return match_model_names(pattern, sorted(repos))
