"""Reductions applied to a layer's output on the device, before anything is copied to the host.

Shapes are per batch: conv maps are (B, C, H, W), token sequences (B, T, D), vectors (B, D). A map laid
out (B, H, W, C) (`channels_last`, see `neuropredictor.layers`) is pooled over H and W as well, to (B, C)
or (B, C, K, K).

    full        keep the tensor as it is
    flatten     (B, prod(rest))
    avgpool     spatial mean of a conv map -> (B, C); token mean of a sequence -> (B, D)
    cls         first token of a sequence (the class token) -> (B, D); refused where there is none
    pool:K      adaptive average pooling of a conv map to K x K -> (B, C, K, K)
    srp:D       sparse random projection of the flattened output to D dims -> (B, D)

SRP matrices depend only on (seed, layer name, input dim, D) and are generated on the CPU with a seeded
torch generator, so every process and every GPU projects identically.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neuropredictor.errors import ReductionError
from neuropredictor.globs import is_glob, matches

NAMES = ("full", "flatten", "avgpool", "cls", "pool", "srp")


@dataclass(frozen=True)
class Reduction:
    name: str
    arg: int | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.arg}" if self.arg is not None else self.name


def parse_reduction(text: str) -> Reduction:
    name, sep, arg = text.strip().partition(":")
    if name not in NAMES:
        raise ReductionError(f"unknown reduction {text!r}; choose one of full, flatten, avgpool, cls, pool:K, srp:D")
    if name in ("pool", "srp"):
        if not sep or not arg.isdigit() or int(arg) < 1:
            raise ReductionError(f"reduction {name} needs a positive size, e.g. {name}:{2 if name == 'pool' else 4096}")
        return Reduction(name, int(arg))
    if sep:
        raise ReductionError(f"reduction {name} takes no argument (got {text!r})")
    return Reduction(name)


def parse_reduce_option(value: str | dict[str, str] | None, layers: list[str]) -> dict[str, Reduction]:
    """`--reduce` as given by a user -> one Reduction per layer.

    "avgpool" applies to every layer; "layer4=avgpool,layer3=pool:2" sets layers one by one (globs as in
    `neuropredictor.globs`);
    a bare entry among them is the default for the layers not named; layers not covered keep `full`. A layer
    named exactly overrides a glob that matches it ("blocks.*=cls,blocks.11=avgpool"); two globs, or two
    bare entries, that give a layer different reductions are refused: the last would win.
    """
    if value is None:
        value = "full"
    items = list(value.items()) if isinstance(value, dict) else [
        tuple(part.split("=", 1)) if "=" in part else (None, part) for part in value.split(",") if part.strip()
    ]
    default, bare = Reduction("full"), None
    per_layer: dict[str, tuple[str, Reduction]] = {}
    for key, red_text in items:
        red = parse_reduction(red_text)
        if key is None:
            if bare is not None and red != default:  # the last one would win, silently
                raise ReductionError(f"reduce gives two reductions for every layer: {bare!r} and {red_text!r}")
            default, bare = red, red_text
            continue
        key = key.strip()
        matched = matches(key, layers)
        if not matched:
            raise ReductionError(f"reduce names layer {key!r}, which is not among the selected layers {layers}")
        for name in matched:
            if name in per_layer and per_layer[name][1] != red:
                before = per_layer[name][0]
                if is_glob(before) != is_glob(key):  # a layer named exactly overrides a glob
                    if is_glob(key):
                        continue
                else:
                    raise ReductionError(f"reduce sets layer {name!r} twice: {before}={per_layer[name][1]} and "
                                         f"{key}={red}; give each layer one reduction")
            per_layer[name] = (key, red)
    return {name: per_layer[name][1] if name in per_layer else default for name in layers}


def _pooled(red: Reduction, channels_last: bool, ndim: int) -> bool:
    """Whether a map must move its channels first for the reduction (a pooling of an (H, W, C) map)."""
    return channels_last and ndim == 3 and red.name in ("avgpool", "pool")


def output_shape(red: Reduction, shape: tuple[int, ...], layer: str = "", channels_last: bool = False,
                 class_token: bool | None = None) -> tuple[int, ...]:
    """Per-sample shape after the reduction, given the per-sample output shape; errors if it does not fit.
    `class_token` is False where the model says its sequences have none (None: it does not say)."""
    where = f" for layer {layer!r} with output shape {tuple(shape)}" if layer else ""
    if _pooled(red, channels_last, len(shape)):
        shape = (shape[2], shape[0], shape[1])
    if red.name == "full":
        return tuple(shape)
    if red.name == "flatten":
        return (math.prod(shape),)
    if red.name == "avgpool":
        if len(shape) in (2, 3):  # (T, D) tokens, or (C, H, W) conv maps
            return (shape[-1],) if len(shape) == 2 else (shape[0],)
        if len(shape) == 1:
            return tuple(shape)
        raise ReductionError(f"avgpool needs a conv map (C,H,W) or tokens (T,D){where}")
    if red.name == "cls":
        if len(shape) != 2:
            raise ReductionError(f"cls needs a token sequence (T, D){where}; use avgpool or pool:K for conv maps")
        if class_token is False:  # registers alone come first: a square test cannot see them
            raise ReductionError(f"cls needs a class token{where}, and the model was built without one (its "
                                 f"first tokens are registers or patches); use avgpool")
        side = math.isqrt(shape[0])
        if shape[0] > 1 and side * side == shape[0]:
            # a class token (plus a distillation token, or 4 registers) on a square grid does not make a square
            # count (k*k + p is square only for p = 2k + 1, ...), so this sequence is patches alone (SigLIP,
            # Swin, Mixer, a ViT's patch embedding)
            raise ReductionError(f"cls needs a sequence that starts with a class token{where}: its {shape[0]} "
                                 f"tokens are a {side}x{side} grid of patches, and the first is a patch; use avgpool")
        return (shape[1],)
    if red.name == "pool":
        if len(shape) != 3:
            raise ReductionError(f"pool:K needs a conv map (C, H, W){where}; use avgpool or cls for tokens")
        if red.arg > min(shape[1], shape[2]):  # adaptive pooling would upsample, inventing values
            raise ReductionError(f"pool:{red.arg} is larger than the {shape[1]}x{shape[2]} map{where}: use "
                                 f"pool:K with K <= {min(shape[1], shape[2])}, or full")
        return (shape[0], red.arg, red.arg)
    if red.name == "srp":
        return (red.arg,)
    raise ReductionError(f"unknown reduction {red}")


def srp_matrix(layer: str, in_dim: int, out_dim: int, seed: int = 0) -> torch.Tensor:
    """The (out_dim, in_dim) very sparse random projection (Li et al. 2006) for one layer, as a CSR tensor.

    Each entry is nonzero with probability 1/sqrt(in_dim), with value +-sqrt(sqrt(in_dim)/out_dim), so
    squared norms are preserved in expectation. Row indices are drawn with replacement and duplicates merged.
    """
    digest = hashlib.sha256(f"neuropredictor-srp|{seed}|{layer}|{in_dim}|{out_dim}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    density = 1.0 / math.sqrt(in_dim)
    counts = torch.binomial(torch.full((out_dim,), float(in_dim)), torch.full((out_dim,), density), generator=gen).long()
    cols = torch.randint(in_dim, (int(counts.sum()),), generator=gen)
    rows = torch.repeat_interleave(torch.arange(out_dim), counts)
    signs = torch.randint(0, 2, (cols.numel(),), generator=gen) * 2 - 1
    flat, first = _unique_first(rows * in_dim + cols)
    values = signs[first].to(torch.float32) * math.sqrt(1.0 / (density * out_dim))
    indices = torch.stack([flat // in_dim, flat % in_dim])
    with warnings.catch_warnings():  # "CSR support is in beta": it is what CPU and CUDA both multiply fast
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(indices, values, (out_dim, in_dim), is_coalesced=True, check_invariants=False)
        return coo.to_sparse_csr()


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values of x and the index of each one's first occurrence."""
    uniq, inverse = torch.unique(x, sorted=True, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(x.numel()), reduce="amin")
    return uniq, first


def apply(red: Reduction, x: torch.Tensor, srp: torch.Tensor | None = None, channels_last: bool = False
          ) -> torch.Tensor:
    """Reduce a batch (B, ...) in float32. The result never shares memory with x (in-place ops after a
    hook, like ReLU(inplace=True), must not change what was recorded)."""
    x = x.float()
    if _pooled(red, channels_last, x.ndim - 1):
        x = x.permute(0, 3, 1, 2)
    if red.name == "full":
        return x.clone()
    if red.name == "flatten":
        return x.reshape(x.shape[0], -1).clone()
    if red.name == "avgpool":
        if x.ndim == 4:
            return x.mean(dim=(2, 3))
        if x.ndim == 3:
            return x.mean(dim=1)
        return x.clone()
    if red.name == "cls":
        return x[:, 0].clone()
    if red.name == "pool":
        return F.adaptive_avg_pool2d(x, red.arg)
    if red.name == "srp":
        flat = x.reshape(x.shape[0], -1)
        return (srp @ flat.T).T.contiguous()
    raise ReductionError(f"unknown reduction {red}")
