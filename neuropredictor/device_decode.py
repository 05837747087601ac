"""Decoding and preprocessing on the extraction device: the GPU fast path for when CPU decoders bind.

Data path with `decode="device"`: DataLoader workers read the encoded bytes out of the tar
(:func:`neuropredictor.corpus.read_shard` with ``transform=None``) and look at each image's header: a JPEG
the device may decode as stored stays bytes, anything else (PNG, WebP, a JPEG with an EXIF rotation) is
decoded there as on the CPU path (`corpus.decode.for_device`). :class:`DeviceDecoder` then decodes the
batch's JPEGs at once with ``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG) and runs the
model's own preprocessing (resize, centre crop, scale, normalise) as tensor ops on that device. The
thread that feeds the device parses no image header (only a JPEG nvJPEG rejects goes to PIL there).

The preprocessing is translated step by step from the model's PIL transform, so both paths use the same
sizes, interpolation and normalisation. They are not bit-identical (nvJPEG's IDCT, and torch's
antialiased resize rounding differently from PIL's); `tests/test_device_decode.py` states the tolerance.
A transform with a step we cannot translate fails at start-up, naming the step.

torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (same calls, `torchcodec.
decoders.decode_jpeg`); they work in the pinned 0.29.1, and moving is one import once TorchCodec is pinned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from neuropredictor.corpus.decode import ImageError, MachineError, decode_pil, decoded, machine_failure, transformed
from neuropredictor.corpus.read import Batch
from neuropredictor.errors import NeuroPredictorError

__all__ = ["DeviceDecoder", "tensor_steps"]

# --------------------------------------------------------------------------------------------------
# the model's transform, as tensor steps


@dataclass(frozen=True)
class _Resize:
    size: Any  # int (shorter side) or (h, w), as torchvision's Resize takes it
    interpolation: Any
    max_size: int | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 in, uint8 out (rounded), like PIL: the later scaling then sees the same kind of values
        return F.resize(x, self.size, interpolation=self.interpolation, max_size=self.max_size, antialias=True)


@dataclass(frozen=True)
class _CenterCrop:
    size: Any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.center_crop(x, self.size)


@dataclass(frozen=True)
class _ToFloat:
    scale: float  # 1/255 for ToTensor-like steps; 1.0 where the transform rescales later itself

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x.to(torch.float32)
        return out * self.scale if self.scale != 1.0 else out


@dataclass(frozen=True)
class _Normalize:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # on each device once: F.normalize copies its lists to the device per image, each copy a blocking sync
    _on: dict = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._on:
            self._on[x.device] = tuple(torch.tensor(v, dtype=torch.float32, device=x.device).view(-1, 1, 1)
                                       for v in (self.mean, self.std))
        mean, std = self._on[x.device]
        return (x - mean) / std


def _tensor_interpolation(mode: Any) -> Any:
    """The tensor resize mode that does what PIL's resampling `mode` does: torch's NEAREST is not PIL's
    (NEAREST_EXACT is), and tensors have no BOX or HAMMING (refused here, not on every image)."""
    from torchvision.transforms import InterpolationMode

    if mode == InterpolationMode.NEAREST:
        return InterpolationMode.NEAREST_EXACT
    if mode in (InterpolationMode.BOX, InterpolationMode.HAMMING):
        raise NeuroPredictorError(f"decode='device' cannot resize with {mode.value} interpolation as tensor ops; "
                                  "use decode='cpu' for this model")
    return mode


# steps that only matter for PIL images: decoding already gives RGB uint8 tensors
_PASS_THROUGH = {"MaybeConvertMode", "ToImage", "_convert_to_rgb", "convert_rgb", "PILToTensor", "MaybePILToTensor"}
_TO_TENSOR = {"ToTensor", "MaybeToTensor"}  # PIL -> float in [0, 1]


def _flatten(transform: Any) -> list[Any]:
    steps = getattr(transform, "transforms", None)
    if isinstance(steps, (list, tuple)):  # torchvision v1/v2 Compose
        return [s for t in steps for s in _flatten(t)]
    return [transform]


def tensor_steps(transform: Callable) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The model's eval transform as tensor steps (uint8 (C, H, W) in, float (C, H, W) out).

    Knows torchvision's Resize, CenterCrop, ToTensor, PILToTensor, ToDtype, ConvertImageDtype, Normalize
    and ImageClassification preset, timm's and open_clip's Maybe* wrappers and neuropredictor.models.hf's
    own steps. Anything else raises NeuroPredictorError naming the step: use decode="cpu" for that model.
    """
    out: list[Callable[[torch.Tensor], torch.Tensor]] = []
    is_float = False
    for step in _flatten(transform):
        name = getattr(step, "__name__", None) or type(step).__name__
        if name == "ImageClassification":  # torchvision's weights presets
            out += [_Resize(list(step.resize_size), _tensor_interpolation(step.interpolation), None),
                    _CenterCrop(list(step.crop_size)),
                    _ToFloat(1 / 255), _Normalize(tuple(step.mean), tuple(step.std))]
            is_float = True
        elif name == "Resize" and not is_float:
            out.append(_Resize(step.size, _tensor_interpolation(step.interpolation), step.max_size))
        elif name == "CenterCrop":
            out.append(_CenterCrop(step.size))
        elif name in _PASS_THROUGH:
            continue
        elif name in _TO_TENSOR or (name == "ConvertImageDtype" and not is_float):
            out.append(_ToFloat(1 / 255))
            is_float = True
        elif name == "ToDtype" and not is_float:
            dtype = step.dtype if isinstance(step.dtype, torch.dtype) else step.dtype.get(torch.Tensor)
            if dtype != torch.float32:
                raise NeuroPredictorError(f"decode='device' supports ToDtype(float32) only, not {dtype}; use decode='cpu'")
            out.append(_ToFloat(1 / 255 if step.scale else 1.0))
            is_float = True
        elif getattr(step, "tensor_ready", False):  # neuropredictor.models.hf's own steps
            out.append(step)
        elif name == "Normalize" and is_float:
            mean = tuple(float(m) for m in torch.as_tensor(step.mean).flatten())
            std = tuple(float(s) for s in torch.as_tensor(step.std).flatten())
            out.append(_Normalize(mean, std))
        else:
            raise NeuroPredictorError(
                f"decode='device' cannot run the model's preprocessing step {step!r} as tensor ops "
                f"(it knows Resize, CenterCrop, ToTensor, ToDtype, Normalize and torchvision's presets). "
                "Use decode='cpu' for this model."
            )
    if not is_float:
        out.append(_ToFloat(1 / 255))
    return out


# --------------------------------------------------------------------------------------------------
# decoding a batch


class DeviceDecoder:
    """Turns a batch read for the device (``Batch.data``: JPEG bytes, or images the workers decoded) into
    preprocessed images on `device`.

    The JPEGs are decoded together in one ``decode_jpeg`` call on the device (one by one if that call
    fails, to isolate the bad file); a JPEG the device decoder rejects is decoded as on the CPU path
    (`corpus.decode.decode_pil`). A sample nothing can decode keeps valid=False with the reason, exactly
    as on the CPU path.
    """

    def __init__(self, transform: Callable, device: str | torch.device, shape: Sequence[int]) -> None:
        self.steps = tensor_steps(transform)
        self.device = torch.device(device)
        self.shape = tuple(shape)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _on_device(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) pixels as a (3, H, W) tensor on the device."""
        return torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, non_blocking=True).permute(2, 0, 1)

    def _pil(self, data: bytes) -> torch.Tensor:
        return self._on_device(np.asarray(decode_pil(data)))

    def _decode_all(self, encoded: dict[int, bytes | np.ndarray], errors: dict[int, str]) -> dict[int, torch.Tensor]:
        images = {j: self._on_device(d) for j, d in encoded.items() if isinstance(d, np.ndarray)}
        jpegs = [j for j in encoded if j not in images]  # bytes (or any bytes-like value)
        if jpegs:
            tensors = [torch.frombuffer(bytearray(encoded[j]), dtype=torch.uint8) for j in jpegs]
            try:  # one call for the whole batch: nvJPEG's batched decoder
                images.update(zip(jpegs, self._decode_jpegs(tensors)))
            except RuntimeError as exc:  # one bad file fails the call: decode them one by one
                self._free_if_full(exc)  # a batch too big for the memory left: one by one may fit
                for j, t in zip(jpegs, tensors):
                    try:
                        images[j] = self._decode_jpegs([t])[0]
                    except RuntimeError as one:  # a JPEG nvJPEG rejects, or too big for it now: PIL reads it
                        self._free_if_full(one)
        for j in [j for j in jpegs if j not in images]:
            try:
                images[j] = decoded(self._pil, encoded[j])
            except ImageError as exc:  # a bad image costs its sample only, never the run
                errors[j] = str(exc)
        return images

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        """decode_jpeg on the device, its outputs allocated on a stream of their own: nvJPEG writes them on a
        private stream that does not wait for ours, so they must not get memory just freed by kernels still
        queued on ours (pytorch/vision#9606: silent corruption on H100)."""
        if self._side is None:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._side):
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        current.wait_stream(self._side)
        for t in out:
            t.record_stream(current)  # freed later, their memory waits for our stream's use of them
        return out

    def _free_if_full(self, exc: RuntimeError) -> None:
        """After nvJPEG ran out of device memory, give back what the allocator caches, for the next try."""
        if machine_failure(exc) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __call__(self, batch: Batch) -> Batch:
        if batch.data is None:
            raise ValueError("DeviceDecoder needs batches read for the device: read_shard(transform=None)")
        n = len(batch)
        images = torch.zeros((n, *self.shape), dtype=torch.float32, device=self.device)
        valid = batch.valid.clone()
        encoded = {j: d for j, d in enumerate(batch.data) if valid[j] and d is not None}
        failures: dict[int, str] = {}
        for j, img in self._decode_all(encoded, failures).items():
            try:
                images[j] = transformed(self._preprocess, img, self.shape)
            except ImageError as exc:
                failures[j] = str(exc)
            except MachineError as exc:
                raise MachineError(f"sample {batch.keys[j]}: {exc}") from exc
        errors = dict(batch.errors)
        for j, reason in failures.items():
            valid[j] = False
            errors[batch.keys[j]] = reason
        return Batch(index=batch.index, keys=batch.keys, images=images, valid=valid, errors=errors)

    def _preprocess(self, img: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            img = step(img)
        return img

