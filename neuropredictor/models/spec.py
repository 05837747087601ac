"""The model spec grammar: `SOURCE:NAME[@TAG]`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from neuropredictor.errors import ModelSpecError

SOURCES = ("timm", "torchvision", "openclip", "clip", "hf", "custom")

GRAMMAR = """\
Model spec: SOURCE:NAME[@TAG]
  timm:resnet50                        timm:vit_base_patch16_224.augreg_in21k_ft_in1k
  torchvision:alexnet                  torchvision:resnet50@IMAGENET1K_V2   (TAG = weights enum member)
  openclip:ViT-B-32@laion2b_s34b_b79k  (TAG = open_clip pretrained tag)
  clip:ViT-B-32                        (OpenAI CLIP weights; open_clip architecture names)
  hf:google/siglip-base-patch16-224    (Hugging Face vision model: hub id or local directory)
  custom:package.module:factory        custom:path/to/file.py:factory
"""


@dataclass(frozen=True)
class ModelSpec:
    source: str
    name: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.name}" + (f"@{self.tag}" if self.tag else "")


def parse_spec(spec: str) -> ModelSpec:
    """Parse `SOURCE:NAME[@TAG]`; raise ModelSpecError with the grammar on anything else."""
    source, sep, rest = spec.strip().partition(":")
    source = source.lower()
    if not sep or not rest:
        raise ModelSpecError(f"model spec {spec!r} has no source prefix.\n{GRAMMAR}")
    if source not in SOURCES:
        close = difflib.get_close_matches(source, SOURCES, n=1)
        raise ModelSpecError(f"unknown model source {source!r} in {spec!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; sources are {', '.join(SOURCES)}.\n{GRAMMAR}")
    name, tag = rest, None
    # hf ids and custom paths may contain '@' only as a tag separator; the last '@' wins
    if "@" in rest:
        name, _, tag = rest.rpartition("@")
        if not name or not tag:
            raise ModelSpecError(f"model spec {spec!r}: empty name or tag around '@'.\n{GRAMMAR}")
    if source == "custom" and ":" not in name:
        raise ModelSpecError(
            f"custom model spec {spec!r} needs a factory: custom:package.module:factory or custom:path/to/file.py:factory"
        )
    return ModelSpec(source, name, tag)
