"""What every loader returns, and the pieces shared by all sources: weights files, offline errors."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from neuropredictor.errors import ModelSpecError, WeightsUnavailableError, first_line
from neuropredictor.models.spec import ModelSpec

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass
class LoadedModel:
    """A model ready for extraction: the network (image tower for CLIP-like models) and its eval preprocessing."""

    spec: ModelSpec
    module: nn.Module
    transform: Transform  # PIL image -> float tensor (C, H, W); picklable, so it runs in DataLoader workers
    input_size: tuple[int, int, int]  # (C, H, W) the transform produces
    # "random:seed<N>", "pretrained:<tag>", "sha256:<checksum of the weights file or folder>", or
    # "state-sha256:<checksum of the parameters and buffers>" (custom factories)
    weights: str
    # modules the pretrained checkpoint has no weights for (initialised at random by the source library,
    # e.g. the pooler of a ViT saved as ViTForImageClassification): their outputs are not the checkpoint's
    untrained: tuple[str, ...] = ()
    # "sha256:<checksum>" of the file that defines a custom model (None for other sources, and for a factory
    # defined in a notebook or script): its code makes the numbers as much as its weights do
    code: str | None = None


UNTRAINED = "neuropredictor_untrained"  # a loader's module attribute that LoadedModel.untrained comes from
CODE = "neuropredictor_code"  # a loader's module attribute that LoadedModel.code comes from


def unknown_model(source: str, what: str, name: str, names: list[str], cutoff: float) -> ModelSpecError:
    """The error for a model name the source does not have: its close names, and a `models` pattern that lists
    that family (the name's start shared with the closest one), or all of the source's."""
    import difflib
    import os

    close = difflib.get_close_matches(name, names, n=8, cutoff=cutoff)
    if not close:  # a name that shares a start with real ones (transpositions further on)
        close = [n for n in names if n.startswith(name[:6])][:8]
    stem = os.path.commonprefix([name, close[0]]) if close else ""
    pattern = f"{source}:{stem}*" if len(stem) >= 3 else f"{source}:*"
    return ModelSpecError(f"{source} has no {what} {name!r}. Close names: {', '.join(close) or 'none'}. List them: "
                          f"neuropredictor models '{pattern}'")


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


@functools.lru_cache(maxsize=None)
def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of url accepts a TCP connection, or the proxy the environment names for it
    (HTTPS_PROXY on a cluster's compute nodes); asked once per process (every model replica loads through
    here, and behind a firewall that drops packets each probe would cost the whole timeout)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        socket.create_connection((parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_when_unreachable() -> Iterator[None]:
    """The Hugging Face hub client (timm, open_clip and transformers download through it) retries a host it
    cannot reach for about a minute: when the hub cannot be reached at all, take weights from the local cache
    only, which succeeds or fails at once."""
    try:
        from huggingface_hub import constants as hub
    except ImportError:
        yield
        return
    if hub.HF_HUB_OFFLINE or _reachable(hub.ENDPOINT):
        yield
        return
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


@contextlib.contextmanager
def pretrained_download(spec: ModelSpec, via_hub: bool = True, random_weights: bool = False) -> Iterator[None]:
    """Turn a failed weights download into an error that says what happened and what to do instead; for
    weights from the Hugging Face hub (`via_hub`), fail fast when the hub cannot be reached.
    `random_weights`: only the model's config was to be downloaded (hf: builds random models from it)."""
    try:
        with _hub_offline_when_unreachable() if via_hub else contextlib.nullcontext():
            yield
    except WeightsUnavailableError:
        raise
    except Exception as exc:
        if not _looks_like_download_failure(exc):
            raise
        if random_weights:
            local = (", or name a local folder saved with save_pretrained (hf:/path/to/model)"
                     if spec.source == "hf" else "")
            raise WeightsUnavailableError(
                f"could not download the config of {spec}, which its random weights are built from too (no "
                f"network access, or offline mode): {type(exc).__name__}: {first_line(exc)}\n"
                f"Fill the cache on a machine with network access first{local}.") from exc
        raise WeightsUnavailableError(
            f"could not download the pretrained weights of {spec} (no network access, or offline mode): "
            f"{type(exc).__name__}: {first_line(exc)}\n"
            f"Pass a local checkpoint as weights=PATH (safetensors or a torch state dict), "
            f"fill the cache on a machine with network access first, or use pretrained=False for random weights."
        ) from exc


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_PREFIXES = ("module.", "visual.", "vision_model.", "model.", "_orig_mod.")


def load_weights_file(module: nn.Module, path: str | Path) -> str:
    """Load a local checkpoint into `module` strictly; returns its checksum.

    safetensors files load as they are; anything else goes through torch.load(weights_only=True), so a
    checkpoint can never run code. Common wrappers ({"state_dict": ...}) and prefixes ("module.",
    "visual." of a full CLIP checkpoint, ...) are undone: of the checkpoint and its prefixed sub-dicts, the
    one that fits the model best is loaded. A checkpoint that does not fit raises one short message.
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
                f"cannot load {path} with torch.load(weights_only=True): {first_line(exc)}\n"
                "Save a plain state dict (torch.save(model.state_dict(), path)) or a .safetensors file."
            ) from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path} does not hold a state dict of tensors")
    wanted = module.state_dict()
    chosen = _best_fit(state, wanted)
    problem = _misfit(state, chosen, wanted)
    if problem:
        raise WeightsUnavailableError(f"{path} does not fit the model: {problem}")
    try:
        module.load_state_dict(chosen, strict=True)
    except RuntimeError as exc:  # torch's message lists every key: keep its first line
        raise WeightsUnavailableError(f"{path} does not fit the model: {first_line(exc)}") from exc
    return weights_digest(path)


def weights_digest(path: str | Path) -> str:
    """A weights file's identity, as stores record it."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


STATE_DIGEST = "state-sha256:"  # weights named by their values: only loading the model tells if they changed


def state_digest(module: nn.Module) -> str:
    """The identity of weights that no file or tag names (a custom factory that loads its own checkpoint):
    a checksum of every parameter's and buffer's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.is_meta:  # extra state, a quantized layer's dtype
            h.update(f"{name}|{value!r}\n".encode())
            continue
        t = value.detach().cpu()
        if t.is_quantized:  # its scales, then its integers
            h.update(repr((t.qscheme(), t.q_scale(), t.q_zero_point()) if t.qscheme() in (
                torch.per_tensor_affine, torch.per_tensor_symmetric) else t.q_per_channel_scales()).encode())
            t = t.int_repr()
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return STATE_DIGEST + h.hexdigest()


def _sub_dicts(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The checkpoint and every sub-dict under the known prefixes, nested two deep ("module.visual.")."""
    out, frontier = [state], [state]
    for _ in range(2):
        frontier = [{k[len(p):]: v for k, v in d.items() if k.startswith(p)} for d in frontier for p in _PREFIXES]
        frontier = [d for d in frontier if d]
        out += frontier
    return out


def _fitting(candidate: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> int:
    return sum(1 for k, v in candidate.items() if k in wanted and tuple(v.shape) == tuple(wanted[k].shape))


def _best_fit(state: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sub-dict with the most keys that fit (name and shape), then the fewest left over. By fit, not by
    names alone: a full CLIP checkpoint's text tower has the image tower's names (transformer.resblocks.*)
    with other shapes, so only its `visual.` sub-dict fits."""
    return max(_sub_dicts(state), key=lambda d: (_fitting(d, wanted), -len(d)))


def _misfit(state: dict[str, torch.Tensor], chosen: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> str:
    """What keeps `chosen` from loading into a model with `wanted`'s keys, in a few lines ("" if it fits)."""
    missing = [k for k in wanted if k not in chosen]
    unexpected = [k for k in chosen if k not in wanted]
    shapes = [k for k in chosen if k in wanted and tuple(chosen[k].shape) != tuple(wanted[k].shape)]
    if not (missing or unexpected or shapes):
        return ""
    parts = [f"{len(missing)} of the model's {len(wanted)} keys missing (e.g. {', '.join(missing[:3])})" if missing else "",
             f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
             f"{len(shapes)} keys with other shapes (e.g. " + ", ".join(
                 f"{k}: {tuple(chosen[k].shape)} in the file, {tuple(wanted[k].shape)} in the model" for k in shapes[:2])
             + ")" if shapes else ""]
    if any(k.startswith("visual.") for k in state):
        cause = ("a full CLIP checkpoint whose image tower (its visual.* keys) is another architecture than the "
                 "spec's: check ARCH in openclip:ARCH")
    elif not _fitting(chosen, wanted):
        cause = "a checkpoint of a different architecture or library (no key fits by name and shape)"
    elif shapes and not (missing or unexpected):
        cause = "another size or variant of this architecture (same layer names, other shapes)"
    else:
        cause = "a checkpoint of a different architecture or variant, or only part of a model"
    return "; ".join(p for p in parts if p) + f". Likely cause: {cause}."
