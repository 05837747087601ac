"""Hooked extraction: one forward pass records every selected layer, reduced on the device.

    with Extractor(model, ["layer1", "layer4"], reduce="avgpool", device="cuda", precision="bf16") as ex:
        feats = ex(images)          # {"layer1": (B, 256), "layer4": (B, 2048)} float32 on the device

The forward pass stops as soon as the last selected layer has produced its output (early exit), so
extracting `layer1` of a ResNet costs only the stem and layer1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import math
import threading

import torch

from neuropredictor import reduce as R
from neuropredictor.errors import LayerNotFoundError, NeuroPredictorError
from neuropredictor.layers import (LayerInfo, describe_layers, expand_presets, has_class_token, named_layers,
                                   pick_tensor, select_layers)
from neuropredictor.models import LoadedModel

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def ieee_fp32() -> None:
    """fp32 computes in fp32 on CUDA: PyTorch runs cuDNN's float32 convolutions in TF32 by default (10 bits of
    mantissa, about 1e-3 relative error in a ResNet's features). A process-wide setting of torch's: set through
    its legacy flags, which keep its flags consistent whichever API set them before."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class _StopForward(BaseException):
    """Raised from the last hook to end the forward pass early. A BaseException, so a model's own
    `except Exception` blocks do not swallow it."""


@dataclass(frozen=True)
class LayerPlan:
    name: str
    reduction: R.Reduction
    in_shape: tuple[int, ...]  # per-sample output shape of the module
    out_shape: tuple[int, ...]  # per-sample shape after the reduction
    calls: int  # times the module runs per forward pass; the last call is recorded
    channels_last: bool = False  # a map laid out (H, W, C): pooled over H and W all the same


class Extractor:
    """Forward hooks on the selected layers of a loaded model; a context manager that removes them on exit."""

    def __init__(
        self,
        model: LoadedModel,
        layers: str | Sequence[str],
        reduce: str | dict[str, str] | None = "full",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        early_exit: bool = True,
        srp_seed: int = 0,
        layer_infos: Sequence[LayerInfo] | None = None,
        compile: bool = False,
        batch_size: int | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise NeuroPredictorError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        if precision == "fp32" and self.device.type == "cuda":
            ieee_fp32()
        self.channels_last = channels_last
        # compiled, the forward pass runs whole: the exception that ends it early breaks the graph into one per
        # block (5 for resnet18), and a ViT's hooks then hit dynamo's recompile limit and run eager
        self.early_exit = early_exit and not compile
        # on the device first: the layer discovery's forward pass runs there (a big model's took seconds on
        # the CPU, for every replica)
        self.module = model.module.to(self.device)
        infos = {i.name: i for i in (layer_infos or describe_layers(model))}
        names = select_layers(list(infos), expand_presets(model, list(infos.values()), layers))
        for name in names:
            if infos[name].calls == 0 or infos[name].shape is None:
                why = "does not run in the model's forward pass" if infos[name].calls == 0 else "has no batch-first tensor output"
                raise LayerNotFoundError(f"layer {name!r} {why}; pick another from: neuropredictor layers {model.spec}")
            # a module without pretrained weights, and whatever contains it or runs after it (its output may
            # flow there), would be stored under the pretrained weights' name
            random = [m for m in model.untrained if name == m or name.startswith(m + ".") or m.startswith(name + ".")
                      or (m in infos and 0 <= infos[m].order <= infos[name].order)]
            if random:
                raise LayerNotFoundError(f"layer {name!r} depends on {', '.join(random)}, which the checkpoint of "
                                         f"{model.spec} has no weights for (initialised at random, not pretrained); "
                                         f"pick a layer that runs before it: neuropredictor layers {model.spec}")
        reductions = R.parse_reduce_option(reduce, names)
        self.plan = {
            n: LayerPlan(n, reductions[n], infos[n].shape,
                         R.output_shape(reductions[n], infos[n].shape, n, infos[n].channels_last,
                                        has_class_token(model.module, n) if reductions[n].name == "cls" else None),
                         infos[n].calls, infos[n].channels_last)
            for n in names
        }
        # the layer whose output comes last in the forward pass ends it
        self._last = max(names, key=lambda n: infos[n].order)
        self._srp = {
            n: R.srp_matrix(n, math.prod(p.in_shape), p.reduction.arg, srp_seed).to(self.device)
            for n, p in self.plan.items()
            if p.reduction.name == "srp"
        }
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        # torch.compile traces the hooks too (they are registered before the first call). One input shape
        # keeps it to one compilation: smaller batches (a shard's last) are padded to `batch_size`, else to
        # the first batch's size (a small first shard would otherwise fix a shape every full batch misses).
        self.compile = compile
        self._forward = torch.compile(self.module, dynamic=False) if compile else self.module
        self._batch: int | None = batch_size
        self._handles: list = []
        self._lock = threading.Lock()  # hooks share per-call state: one forward pass at a time
        # True during __call__'s forward pass only: the hooks record (and stop the pass) then, so the module
        # run by itself, by another Extractor or by `describe_layers` goes through them untouched. A plain flag
        # (not the thread's id): torch.compile guards on it instead of breaking its graph at every hook
        self._recording = False
        self._calls: dict[str, int] = {}
        self._out: dict[str, torch.Tensor] = {}

    @property
    def layers(self) -> list[str]:
        return list(self.plan)

    def __enter__(self) -> Extractor:
        modules = dict(named_layers(self.module))
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.plan]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        plan = self.plan[name]

        def hook(_module, _inputs, output):
            if not self._recording:
                return
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._calls[name] < plan.calls:
                return  # a shared module: record its last call only
            with torch.autocast(self.device.type, enabled=False):
                self._out[name] = R.apply(plan.reduction, pick_tensor(output), self._srp.get(name),
                                          plan.channels_last)
            if self.early_exit and name == self._last and len(self._out) == len(self.plan):
                raise _StopForward

        return hook

    # not inference_mode: its tensors refuse autograd and in-place updates outside it (a linear probe on the
    # features, `f -= f.mean(0)`), and it saves nothing measurable next to the forward pass
    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one batch (B, C, H, W) of preprocessed images (`model.transform`'s outputs, stacked); returns
        {layer: reduced float32 tensor on the device}."""
        if not self._handles:
            raise RuntimeError("use the Extractor as a context manager: `with Extractor(...) as ex: ex(images)`")
        x = _batch_tensor(images)
        x = x.to(self.device, non_blocking=True)
        n = x.shape[0]
        if self.compile:
            self._batch = self._batch or n
            if n < self._batch:  # eval mode: padding rows do not touch the real ones
                x = torch.cat([x, x.new_zeros((self._batch - n, *x.shape[1:]))])
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        with self._lock:
            self._calls, self._out, self._recording = {}, {}, True
            try:
                with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    self._forward(x)
            except _StopForward:
                pass
            finally:
                self._recording = False
            out, self._out = self._out, {}
        missing = [name for name in self.plan if name not in out]
        if missing:
            raise NeuroPredictorError(f"layers {missing} did not produce an output in this forward pass")
        return {name: t[:n] for name, t in out.items()} if x.shape[0] != n else out


def _batch_tensor(images: Any) -> torch.Tensor:
    """The batch as a float tensor (B, C, H, W), or a NeuroPredictorError that says how to make one."""
    how = ("make a batch with `torch.stack([model.transform(neuropredictor.read_image(path)) for path in paths])`")
    if not isinstance(images, torch.Tensor):
        raise NeuroPredictorError(f"the Extractor takes a tensor batch (B, C, H, W) of preprocessed images, not a "
                                  f"{type(images).__name__}: {how}")
    if images.ndim != 4:
        extra = " (one image: add the batch dimension, `image[None]`)" if images.ndim == 3 else ""
        raise NeuroPredictorError(f"the Extractor takes a batch (B, C, H, W); got shape {tuple(images.shape)}{extra}")
    # float64 as float32; integer batches as they are (a custom model may normalise uint8 pixels itself)
    return images.float() if images.is_floating_point() else images
