"""What every loader returns, and the pieces shared by all sources: weights files, offline errors."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from neuropredictor.errors import WeightsUnavailableError
from neuropredictor.models.spec import ModelSpec

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class LoadedModel:
    """A model ready for extraction: the network (image tower for CLIP-like models) and its eval preprocessing."""

    spec: ModelSpec
    module: nn.Module
    transform: Transform  # PIL image -> float tensor (C, H, W); picklable, so it runs in DataLoader workers
    input_size: tuple[int, int, int]  # (C, H, W) the transform produces
    weights: str  # "random", "pretrained:<tag>" or "sha256:<checksum of the weights file>"


def imagenet_transform(resize: int = 256, crop: int = 224) -> Transform:
    """The classic ImageNet evaluation preprocessing (resize 256, centre crop 224, normalise)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize(resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(crop),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )


def transform_output_size(transform: Transform) -> tuple[int, int, int]:
    """Shape a transform produces, found by running it on a square dummy image (one rule for every source)."""
    out = transform(Image.new("RGB", (512, 512), (128, 128, 128)))
    if not isinstance(out, torch.Tensor) or out.ndim != 3:
        raise TypeError(f"the model's transform must return a (C, H, W) tensor, got {type(out).__name__}")
    return tuple(out.shape)  # type: ignore[return-value]


_NETWORK_ERROR_NAMES = {
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionError",
    "ReadTimeout",
    "HfHubHTTPError",
    "HTTPError",
    "RepositoryNotFoundError",
    "GatedRepoError",
}


def _looks_like_download_failure(exc: BaseException) -> bool:
    for e in _exception_chain(exc):
        if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if type(e).__name__ in _NETWORK_ERROR_NAMES:
            return True
        msg = str(e).lower()
        if any(s in msg for s in ("offline", "internet connection", "could not resolve", "name or service not known",
                                  "connection refused", "cannot find the requested files in the local cache",
                                  "couldn't connect", "we couldn't connect")):
            return True
    return False


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def pretrained_download(spec: ModelSpec) -> Iterator[None]:
    """Turn a failed weights download into an error that says what happened and what to do instead."""
    try:
        yield
    except WeightsUnavailableError:
        raise
    except Exception as exc:
        if not _looks_like_download_failure(exc):
            raise
        raise WeightsUnavailableError(
            f"could not download the pretrained weights of {spec} (no network access, or offline mode): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            f"Pass a local checkpoint as weights=PATH (safetensors or a torch state dict), "
            f"fill the cache on a machine with network access first, or use pretrained=False for random weights."
        ) from exc


def file_checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_PREFIXES = ("module.", "visual.", "vision_model.", "model.", "_orig_mod.")


def load_weights_file(module: nn.Module, path: str | Path) -> str:
    """Load a local checkpoint into `module` strictly; returns its checksum.

    safetensors files load as they are; anything else goes through torch.load(weights_only=True), so a
    checkpoint can never run code. Common wrappers ({"state_dict": ...}) and prefixes ("module.",
    "visual." of a full CLIP checkpoint, ...) are undone.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # not a safetensors file, or a damaged one
            raise WeightsUnavailableError(
                f"cannot read {path} as a safetensors file ({type(exc).__name__}: {exc}): the file is damaged "
                "or not safetensors. Download it again, or pass a torch state dict (.pt) as weights=PATH."
            ) from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"cannot load {path} with torch.load(weights_only=True): {exc}\n"
                "Save a plain state dict (torch.save(model.state_dict(), path)) or a .safetensors file."
            ) from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path} does not hold a state dict of tensors")
    state = _strip_prefix(state, set(module.state_dict()))
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"{path} does not fit the model: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    return file_checksum(path)


def _strip_prefix(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    if set(state) & wanted:
        return state
    for prefix in _PREFIXES:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped and set(stripped) & wanted:
            return stripped
    return state
