"""One sample's image, decoded and preprocessed, or the reason it cannot be.

Shared by the CPU path (PIL in the DataLoader workers) and the device path
(`neuropredictor.device_decode`), so a bad image is kept as an invalid row with the same reason
whichever decoder met it. Nothing here raises past a sample: a bad image costs its row, never the run.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from neuropredictor.corpus.make import IMAGE_EXTENSIONS
from neuropredictor.corpus.tar import short


class ImageError(Exception):
    """A sample that cannot become a row of the batch; str(exc) is the reason recorded in the manifest."""


def image_bytes(data: bytes | None, fields: Sequence[str]) -> bytes:
    """The sample's encoded image, or ImageError if it has none or an empty one."""
    if data is None:
        raise ImageError(short(f"no image member ({', '.join(IMAGE_EXTENSIONS)}) in the sample; "
                               f"it has: {', '.join(fields) or 'nothing'}"))
    if not data:
        raise ImageError("cannot decode image: empty image member (0 bytes)")
    return data


def decode_pil(data: bytes) -> Image.Image:
    """Decode fully (so a truncated file fails here, not later) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # LOAD_TRUNCATED_IMAGES stays False
        return img.convert("RGB")


def decoded(decode: Callable[[Any], Any], data: Any) -> Any:
    try:
        return decode(data)
    except Exception as exc:
        raise ImageError(short(f"cannot decode image: {type(exc).__name__}: {exc}")) from None


def transform_problem(out: Any, shape: tuple[int, ...]) -> str | None:
    """Why a transform's output cannot be a row of the batch (None when it can)."""
    if isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape):
        return None
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    return short(f"transform gave {got}, expected a tensor of shape {tuple(shape)}")


def transformed(transform: Callable[[Any], Any], image: Any, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        out = transform(image)
    except Exception as exc:
        raise ImageError(short(f"transform failed: {type(exc).__name__}: {exc}")) from None
    problem = transform_problem(out, shape)
    if problem:
        raise ImageError(problem)
    return out
