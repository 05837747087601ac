"""Listing, describing and selecting a model's layers (its named modules).

Which tensor a layer records: a module's output is used as it is when it is a tensor. Otherwise:
a dict or Hugging Face ModelOutput gives its `last_hidden_state` if it has one, else its first tensor
value; a tuple or list gives its first element that holds a tensor (attention blocks that return
`(hidden, weights)` record `hidden`); a dataclass is read like a dict of its fields. The rule applies
recursively. A module that runs several times in one forward pass (torchvision ResNet's shared `relu`)
records its last call. The whole model's output is the pseudo-layer `output`.

Where the channels are: a map with three dimensions per image is (C, H, W) in most networks, but (H, W, C)
in Swin, MambaOut or ConvNeXt's inner blocks, which permute to run Linear and LayerNorm over channels.
PyTorch's own layer types say which: convolutions, batch and group norms and poolings are channels first,
Linear and LayerNorm channels last, a permutation (torchvision's `Permute`) says where it moves them; any
other module (a block, a stage, an activation) is laid out like the last of those that gave an output of
its shape before it in the forward pass, or, when none did, as its shape reads: (H, H, C) channels last.
Where a map has C == H == W, shapes cannot tell (a block's inner Linear has its output's shape): a second
pass with a taller input finds which dimension grows, for models that take other sizes.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuropredictor.config import split_commas
from neuropredictor.errors import LayerNotFoundError
from neuropredictor.globs import glob_regex, matches
from neuropredictor.models import LoadedModel

ROOT = "output"  # name of the whole model's output


def pick_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a layer records from whatever its module returned (see module docstring)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if isinstance(output.get("last_hidden_state"), torch.Tensor):
            return output["last_hidden_state"]
        values: Iterable = output.values()
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        values = (getattr(output, f.name) for f in dataclasses.fields(output))
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for value in values:
        tensor = pick_tensor(value)
        if tensor is not None:
            return tensor
    return None


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    leaf: bool
    shape: tuple[int, ...] | None  # output shape for one image; None if the module did not run
    params: int
    calls: int  # times the module ran in one forward pass
    order: int  # position of its (last) call in the forward pass; -1 if it did not run
    channels_last: bool = False  # a map laid out (H, W, C), not (C, H, W) (see the module's docstring)


_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                   nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def _says_channels_last(module: nn.Module, shape: tuple[int, ...]) -> bool | None:
    """Whether a module's type fixes its map's layout: True for (H, W, C), False for (C, H, W), None if not."""
    # a LayerNorm over the channels of an NCHW map (timm's LayerNorm2d, HF's channels_first ConvNeXt norm)
    if isinstance(module, _CHANNELS_FIRST) or (isinstance(module, nn.LayerNorm) and (
            type(module).__name__.startswith("LayerNorm2d")
            or getattr(module, "data_format", None) == "channels_first")):
        return False
    if isinstance(module, nn.Linear) or (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
                                         and module.normalized_shape[0] == shape[-1]):
        return True
    dims = getattr(module, "dims", None)  # a permuting module
    return {(0, 2, 3, 1): True, (0, 3, 1, 2): False}.get(tuple(dims)) if isinstance(dims, (list, tuple)) else None


def named_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every layer, the root last as `output`."""
    return [(n, m) for n, m in module.named_modules() if n] + [(ROOT, module)]


@torch.inference_mode()
def describe_layers(model: LoadedModel) -> list[LayerInfo]:
    """Every layer with its output shape for one image, found by one real forward pass with hooks on a
    dummy batch of the model's input size."""
    module = model.module
    device = next(module.parameters(), torch.empty(0)).device
    layers = named_layers(module)
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    order: dict[str, int] = {}
    channels_last: dict[str, bool] = {}
    last_layout: dict[tuple[int, ...], bool] = {}  # map shape -> layout of the last module whose type fixed it
    counter = iter(range(1 << 30))

    def record(name: str, mod: nn.Module, shape: tuple[int, ...] | None) -> None:
        calls[name] = calls.get(name, 0) + 1
        order[name] = next(counter)
        shapes[name] = shape
        if shape is not None and len(shape) == 3:
            says = _says_channels_last(mod, shape)
            if says is not None:
                last_layout[shape] = says
            channels_last[name] = last_layout.get(shape, shape[0] == shape[1] != shape[2])

    _trace(module, layers, torch.randn(2, *model.input_size, device=device), record)
    # A map with C == H == W (ConvNeXt's 96 channels at 96 x 96) cannot say its layout by its shape or
    # its neighbours'; a taller input can: the dimension that grows is H.
    if any(s is not None and len(s) == 3 and s[0] == s[1] == s[2] for s in shapes.values()):
        taller: dict[str, tuple[int, ...] | None] = {}
        c, h, w = model.input_size
        try:
            _trace(module, layers, torch.randn(2, c, h + 64, w, device=device),
                   lambda name, _mod, shape: taller.__setitem__(name, shape))
        except Exception:  # a model that takes one input size only: the type rules stand
            taller = {}
        for name, shape in shapes.items():
            other = taller.get(name)
            if shape is not None and len(shape) == 3 and other is not None and len(other) == 3:
                grew = [i for i in range(3) if other[i] != shape[i]]
                if grew in ([0], [1]):
                    channels_last[name] = grew == [0]
    return [LayerInfo(name=name, type=type(mod).__name__, leaf=next(mod.children(), None) is None,
                      shape=shapes.get(name), params=sum(p.numel() for p in mod.parameters()),
                      calls=calls.get(name, 0), order=order.get(name, -1),
                      channels_last=channels_last.get(name, False)) for name, mod in layers]


def _trace(module: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor,
           record: Callable[[str, nn.Module, tuple[int, ...] | None], None]) -> None:
    """One forward pass of `x` (a batch of 2) with `record(name, module, per-image shape)` on every output."""
    def hook_for(name: str):
        def hook(mod, _inp, out):
            t = pick_tensor(out)
            # batch of 2, so a layout without the batch first (T, B, D) is recognisable
            record(name, mod, tuple(t.shape[1:]) if t is not None and t.ndim >= 1 and t.shape[0] == 2 else None)

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers]
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()


def has_class_token(root: nn.Module, name: str) -> bool | None:
    """Whether the model says that layer `name`'s tokens start with a class token: the nearest module
    holding the layer with a `cls_token` attribute answers (timm's ViT family sets it to None when built
    without one, as the `*_reg4_gap_*` models are, whose first token is a register). None where none says."""
    parts = [] if name == ROOT else name.split(".")
    for depth in range(len(parts), -1, -1):
        module = root.get_submodule(".".join(parts[:depth]))
        if hasattr(module, "cls_token"):
            return module.cls_token is not None
    return None


def select_layers(names: Sequence[str], patterns: str | Sequence[str]) -> list[str]:
    """Resolve exact names and globs against the model's layer names, in model order.

    Raises LayerNotFoundError naming the closest real layers for every pattern that matches nothing.
    """
    patterns = split_commas(patterns)
    if not patterns:
        raise LayerNotFoundError("no layers given; list them with: neuropredictor layers SPEC")
    chosen: set[str] = set()
    for pattern in patterns:
        hits = matches(pattern, names)
        if not hits:
            raise LayerNotFoundError(_unknown_message(pattern, names))
        chosen.update(hits)
    return [n for n in names if n in chosen]


PRESETS = ("auto",)
# Trunks of numbered blocks, first match wins: timm/DeiT/open_clip/HF ViT, SigLIP/CLIP (HF), Swin, ConvNeXt...
_BLOCK_TRUNKS = ("blocks", "encoder.layers", "encoder.layer", "encoder.stages", "encoder.blocks",
                 "transformer.resblocks", "layers", "stages", "layer")


def preset_layers(model: LoadedModel, infos: Sequence[LayerInfo], preset: str = "auto") -> list[str]:
    """The layers a preset names, in forward order. `auto`: a model's representative depth points, found
    without knowing its layer names, by the first rule that applies:

    1. a timm model, or one inside (open_clip's `trunk`): the modules of timm's own `feature_info` (stage
       outputs of conv nets, every block of vision transformers);
    2. a trunk of blocks (`blocks`, `encoder.layers`, `encoder.layer`, `encoder.stages`, `encoder.blocks`,
       `transformer.resblocks`, `layers`, `stages`, `layer`): every block's output (a stage that ends by
       merging patches, as in HF Swin: its last block's, at the stage's own resolution);
    3. ResNet-style stages `layer1`, `layer2`, ...;
    4. a `features` sequence (torchvision AlexNet, VGG, DenseNet, MobileNet, ...): the last module at each
       spatial resolution, and the last one;
    5. otherwise: the model's top-level children, in forward order.

    Only modules that run and give a batch-first tensor count; the whole model's `output` is not included.
    """
    if preset not in PRESETS:
        raise LayerNotFoundError(f"unknown layer preset {preset!r}; presets: {', '.join(PRESETS)}")
    usable = {i.name: i for i in infos if i.calls > 0 and i.shape is not None and i.name != ROOT}

    def ordered(names: Iterable[str]) -> list[str]:
        return sorted(dict.fromkeys(n for n in names if n in usable), key=lambda n: usable[n].order)

    for prefix, mod in [("", model.module), *((n + ".", m) for n, m in model.module.named_children())]:
        feature_info = getattr(mod, "feature_info", None)
        if type(mod).__module__.startswith("timm.") and isinstance(feature_info, list):
            found = ordered(prefix + str(f.get("module")) for f in feature_info if isinstance(f, dict))
            if found:
                return found
    def children(name: str) -> list[str]:
        return ordered(n for n in usable if n.startswith(name + ".") and "." not in n[len(name) + 1:])

    for trunk in _BLOCK_TRUNKS:
        found = children(trunk)
        if len(found) >= 2:
            # a stage that ends by merging patches (HF Swin, FocalNet) gives the merged, next-resolution map:
            # its last block gives the stage's own, as timm's stages do
            return [next((blocks[-1] for inner in ("blocks", "layers") if (blocks := children(f"{n}.{inner}"))), n)
                    if f"{n}.downsample" in usable else n for n in found]
    found = ordered(n for n in usable if re.fullmatch(r"layer\d+", n))
    if found:
        return found
    features = ordered(n for n in usable if n.startswith("features.") and "." not in n[len("features."):])
    if features:
        spatial = [usable[n].shape[1:] for n in features]
        return [n for i, n in enumerate(features) if i == len(features) - 1 or spatial[i] != spatial[i + 1]]
    return ordered(n for n in usable if "." not in n)


def expand_presets(model: LoadedModel, infos: Sequence[LayerInfo], patterns: str | Sequence[str]) -> list[str]:
    """Layer patterns with presets (`auto`) replaced by the layers they name."""
    out: list[str] = []
    for pattern in split_commas(patterns):
        out += preset_layers(model, infos, pattern) if pattern in PRESETS else [pattern]
    return out


def _unknown_message(pattern: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=6, cutoff=0.5)
    if not close:  # fall back to layers sharing the pattern's first segment
        head = pattern.split(".")[0].rstrip("*")
        close = [n for n in names if head and n.startswith(head)][:6]
    if not close:
        close = [n for n in names if "." not in n][:8]
    return (
        f"unknown layer {pattern!r}. Closest layers: {', '.join(close) or '(none)'}.\n"
        "Names are module paths (`*` matches within one dotted segment); "
        "see all of them with: neuropredictor layers SPEC"
    )


def filter_layers(infos: Sequence[LayerInfo], pattern: str | None) -> list[LayerInfo]:
    """For `neuropredictor layers SPEC PATTERN`: the layers a glob matches (same rules as selection).
    A pattern that matches nothing raises LayerNotFoundError naming the closest layers."""
    if not pattern:
        return list(infos)
    regex = glob_regex(pattern)
    found = [i for i in infos if regex.match(i.name)]
    if not found:
        raise LayerNotFoundError(_unknown_message(pattern, [i.name for i in infos]))
    return found
