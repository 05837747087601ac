"""torchvision models: `torchvision:NAME[@WEIGHTS]`, WEIGHTS a member of the model's weights enum."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from neuropredictor.errors import ModelSpecError
from neuropredictor.globs import match_model_names
from neuropredictor.models.base import (
    Transform,
    imagenet_transform,
    pretrained_download,
    unknown_model,
)
from neuropredictor.models.spec import ModelSpec


def load(spec: ModelSpec, pretrained: bool) -> tuple[nn.Module, Transform, str]:
    import torchvision.models as tvm

    names = tvm.list_models()
    if spec.name not in names:
        raise unknown_model("torchvision", "model", spec.name, names, cutoff=0.5)
    try:
        enum = tvm.get_model_weights(spec.name)
    except ValueError:
        enum = None
    member = None
    if enum is not None:
        tag = spec.tag or "DEFAULT"
        try:
            member = enum[tag]
        except KeyError:
            raise ModelSpecError(
                f"{spec.name} has no weights {tag!r}; choose one of {[m.name for m in enum]}"
            ) from None
    elif spec.tag:
        raise ModelSpecError(f"torchvision:{spec.name} has no weights enum, so no tag {spec.tag!r}")
    if pretrained:
        if member is None:
            raise ModelSpecError(f"torchvision:{spec.name} has no pretrained weights; use pretrained=False or weights=PATH")
        with pretrained_download(spec, via_hub=False):  # torchvision's weights come from download.pytorch.org
            model = tvm.get_model(spec.name, weights=member)
        weights = f"pretrained:{member}"
    else:
        model = tvm.get_model(spec.name, weights=None, **_implied(spec.name, member))
        weights = "random"
    # the weights' own eval transform is known without downloading anything
    transform = member.transforms() if member is not None else imagenet_transform()
    return model, transform, weights


def _implied(name: str, member: Any) -> dict[str, Any]:
    """What torchvision's builders set when given the weights `member`, for the same network built without
    downloading them (random weights, or a checkpoint of them: `weights=PATH`); and never a backbone's
    pretrained weights then."""
    import torchvision.models as tvm

    kwargs: dict[str, Any] = {}
    if "weights_backbone" in inspect.signature(tvm.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None
    if member is not None:
        if "categories" in member.meta:
            kwargs["num_classes"] = len(member.meta["categories"])
        if name in ("inception_v3", "googlenet"):  # their weights expect inputs renormalised inside
            kwargs["transform_input"] = True
        if name == "googlenet":  # its builder drops the auxiliary heads after loading the weights
            kwargs["aux_logits"] = False
        if name.startswith("vit_"):  # SWAG weights are for 384 and 518 px
            kwargs["image_size"] = member.meta["min_size"][0]
    return kwargs


def list_models(pattern: str | None = None) -> list[str]:
    import torchvision.models as tvm

    out = []
    for name in tvm.list_models():
        try:
            tags = [m.name for m in tvm.get_model_weights(name)]
        except ValueError:
            tags = []
        out += [name] + [f"{name}@{t}" for t in tags]
    return match_model_names(pattern, out)
