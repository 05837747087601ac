"""One sample's image, decoded and preprocessed, or the reason it cannot be.

Shared by the CPU path (PIL in the DataLoader workers) and the device path
(`neuropredictor.device_decode`), so a bad image is kept as an invalid row with the same reason
whichever decoder met it. Nothing here raises past a sample: a bad image costs its row, never the run.
Except the machine's own failures (MachineError): they fail the shard, which is tried again.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from neuropredictor.corpus.make import IMAGE_EXTENSIONS
from neuropredictor.corpus.tar import short


class ImageError(Exception):
    """A sample that cannot become a row of the batch; str(exc) is the reason recorded in the manifest."""


class MachineError(Exception):
    """The machine failed while preparing a sample (host or device memory full for a moment), not the image: the
    shard fails and is tried again (a sample marked invalid for it would stay so in a committed shard)."""


_NO_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")  # said in a plain RuntimeError


def machine_failure(exc: BaseException) -> bool:
    """Whether exc is the machine's failure: memory, the host's or the device's (torch's CPU allocator and some CUDA
    libraries say so in a plain RuntimeError)."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in _NO_MEMORY))


def image_bytes(data: bytes | None, fields: Sequence[str]) -> bytes:
    """The sample's encoded image, or ImageError if it has none or an empty one."""
    if data is None:
        dotted = [f for f in fields if "." in f and f.rsplit(".", 1)[1] in IMAGE_EXTENSIONS]
        why = (f"; a member's field is all after the first '.' of its file name (WebDataset's rule), so "
               f"'{dotted[0]}' is not an image field: name files without dots before the extension"
               if dotted else "")
        raise ImageError(short(f"no image member ({', '.join(IMAGE_EXTENSIONS)}) in the sample; "
                               f"it has: {', '.join(fields) or 'nothing'}{why}"))
    if not data:
        raise ImageError("cannot decode image: empty image member (0 bytes)")
    return data


MAX_PIXELS = 64_000_000
"""Largest image decoded (width x height, e.g. 8000 x 8000): a larger one is an invalid sample with the
reason, checked from the header before decoding, so a tiny file claiming 10000 x 10000 pixels never
costs a gigabyte."""

BACKGROUND = (128, 128, 128)
"""Transparent pixels are composited over mid-grey: the same neutral value wherever an image is see-through."""

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # greyscale read as 16-bit values (0..65535)
_INT32 = "I"  # 32-bit greyscale has no nominal range: one whose values are all 8-bit is an 8-bit picture
_TRANSPARENT = {"RGBA", "LA", "PA", "RGBa", "La"}


def _too_large(size: str) -> ImageError:
    return ImageError(f"image is {size} Mpx, over the limit of {MAX_PIXELS / 1e6:g} Mpx "
                      "(neuropredictor.corpus.decode.MAX_PIXELS): downscale it")


def open_image(data: bytes) -> Image.Image:
    """PIL's image over encoded bytes, from its header only (pixels not decoded yet); ImageError when it has
    more than MAX_PIXELS pixels. PIL's own bomb check (a warning from 89 Mpx, an error of its own from
    179 Mpx) gives way to this one limit and its one reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            pixels = _PIL_BOMB_SIZE.search(str(exc))
            raise _too_large(f"{int(pixels.group(1)) / 1e6:.1f}" if pixels else "over 179") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise _too_large(f"{w}x{h} = {w * h / 1e6:.1f}")
    return img


def needs_rotation(img: Image.Image) -> bool:
    """Whether the image's EXIF orientation says it is displayed rotated or mirrored."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
    except Exception:  # unreadable EXIF: shown as stored, like most viewers do
        return False


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as the image is displayed: 16-bit greyscale scaled (v * 255 / 65535, rounded) rather than
    clipped (32-bit integer greyscale too, unless all its values lie in 0..255: an 8-bit picture);
    floating-point greyscale (TIFF "F") in [0, 1] scaled by 255, other floats clipped to [0, 255];
    transparency composited over BACKGROUND."""
    if img.mode == "F":  # PIL's own conversion clips: a [0, 1] stimulus became black
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
        return Image.fromarray(np.rint(values * scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in _SIXTEEN_BIT:
        wide = np.asarray(img).astype(np.int64).clip(0, 65535)
        if img.mode == _INT32 and wide.max(initial=0) <= 255:
            return Image.fromarray(wide.astype(np.uint8), "L").convert("RGB")
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in _TRANSPARENT or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        back = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        return Image.alpha_composite(back, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_pil(data: bytes) -> Image.Image:
    """Decode fully (so a truncated file fails here, not later), turned as its EXIF orientation says, as
    8-bit RGB (`to_rgb`); the first frame of an animation. Oversized images raise ImageError unread."""
    with open_image(data) as img:
        img.load()  # LOAD_TRUNCATED_IMAGES stays False
        if needs_rotation(img):
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def read_image(source: str | os.PathLike | bytes, storage_options: Mapping | None = None) -> Image.Image:
    """One image file (a path or fsspec URL, or its bytes) decoded as the pipeline decodes it (`decode_pil`:
    EXIF rotation, transparency over grey, 16-bit and palette images to 8-bit RGB), for a notebook's own
    batches: `model.transform(read_image(path))` is the tensor the store's row was computed from. A file
    that cannot be decoded raises ImageError with the reason a store would record."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_pil(bytes(source))
    from neuropredictor import fs as fsx

    with fsx.open_url(os.fspath(source), "rb", storage_options) as f:
        return decode_pil(f.read())


JPEG_MAGIC = b"\xff\xd8"
JPEG_END = b"\xff\xd9"


def for_device(data: bytes) -> bytes | np.ndarray:
    """One image as the device path takes it, prepared in the DataLoader worker: its bytes when it is a
    JPEG a JPEG decoder (nvJPEG) may decode as stored (within MAX_PIXELS, no EXIF rotation, baseline colour
    or greyscale, from the header only: nvJPEG decodes progressive JPEGs on the host one by one, and a CMYK
    one fails its whole batch; ending in its end-of-image marker: a GPU's batch decoder may pass a truncated
    file as garbage pixels), else its pixels decoded here as on the CPU path (`decode_pil`; uint8
    (H, W, 3)). ImageError when
    it cannot be decoded. An array, not a tensor: a tensor per image would hold a file descriptor each on
    its way out of the worker (thousands in flight exhaust the process's limit); an array is pickled."""
    if data[:2] == JPEG_MAGIC and data.rstrip(b"\0")[-2:] == JPEG_END:
        try:
            with open_image(data) as img:
                if not needs_rotation(img) and img.mode in ("RGB", "L") and not img.info.get("progressive"):
                    return data
        except Exception:
            pass  # decode_pil names the problem
    return np.asarray(decoded(decode_pil, data))


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-f]+>")
_PIL_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")


def decoded(decode: Callable[[Any], Any], data: Any) -> Any:
    try:
        return decode(data)
    except ImageError:
        raise
    except Exception as exc:
        if machine_failure(exc):
            raise MachineError(short(f"{type(exc).__name__}: {exc}")) from exc
        # PIL names the in-memory file it was given ("<_io.BytesIO object at 0x7f...>"): an address that
        # differs run to run in the manifest and tells the user nothing
        text = _OBJECT_REPR.sub("", str(exc))
        raise ImageError(short(f"cannot decode image: {type(exc).__name__}: {text}")) from None


def transformed(transform: Callable[[Any], Any], image: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The transform's output, if it can be a row of the batch (a tensor of `shape`); else ImageError."""
    try:
        out = transform(image)
    except Exception as exc:
        if machine_failure(exc):
            raise MachineError(short(f"{type(exc).__name__}: {exc}")) from exc
        raise ImageError(short(f"transform failed: {type(exc).__name__}: {exc}")) from None
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ImageError(short(f"transform gave {got}, expected a tensor of shape {tuple(shape)}"))
    return out
