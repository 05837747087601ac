"""timm models: `timm:NAME` (timm's own names, pretrained tags included after a dot)."""

from __future__ import annotations


from torch import nn

from neuropredictor.errors import ModelSpecError
from neuropredictor.globs import match_model_names
from neuropredictor.models.base import Transform, pretrained_download, unknown_model
from neuropredictor.models.spec import ModelSpec


def load(spec: ModelSpec, pretrained: bool) -> tuple[nn.Module, Transform, str]:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    name = f"{spec.name}.{spec.tag}" if spec.tag else spec.name
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise unknown_model("timm", "model", arch, timm.list_models(), cutoff=0.75)
    if "." in name and name not in (tagged := timm.list_pretrained(f"{arch}.*")):
        tags = ", ".join(t.split(".", 1)[1] for t in tagged) or "none"
        raise ModelSpecError(f"timm has no weights {name.split('.', 1)[1]!r} for {arch}; its tags: {tags}")
    if pretrained:
        with pretrained_download(spec):
            model = timm.create_model(name, pretrained=True)
        tag = model.pretrained_cfg.get("tag") or ""
        weights = f"pretrained:{arch}.{tag}" if tag else f"pretrained:{arch}"
    else:
        # the name may carry a tag: its pretrained_cfg still sets the right input size and normalisation
        model = timm.create_model(name, pretrained=False)
        weights = "random"
    cfg = resolve_model_data_config(model)
    return model, create_transform(**cfg, is_training=False), weights


def list_models(pattern: str | None = None) -> list[str]:
    import timm

    # names with a pretrained tag (resnet50.a1_in1k) when the pattern names one
    return match_model_names(pattern, sorted(timm.list_models(pretrained=bool(pattern and "." in pattern))))
