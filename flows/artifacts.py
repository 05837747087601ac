"""What the flows' artifacts may hold: the Prefect UI renders them, and Prefect Cloud refuses a request body
over 5 MiB, which would fail a run after its work is done. Tables and images are bounded here. And what they are
called: each store's keys its own."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor.redact import redact_text

MAX_ROWS = 500  # rows of a table artifact (a table of 10,000 shards is 2 MiB)
MAX_IMAGE_BYTES = 1 << 20  # an image embedded in a markdown artifact (base64 adds a third)


def artifact_key(kind: str, url: str, *parts: str) -> str:
    """An artifact's key: its kind, the store (or folder) it is about, then `parts` (a group of shards). The UI's
    Artifacts page keeps a key's history: one key for every store showed whichever ran last. The store is its
    name and a hash of its URL (two stores named alike in other folders); Prefect takes [a-z0-9-] only."""
    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

    url = str(url).rstrip("/")
    where = url if "://" in url else os.path.abspath(url)  # one store, however its path was spelled
    name = slug(re.sub(r"\.zarr$", "", fsx.basename(url)))[:40].strip("-")
    # the hash also tells apart groups whose labels the length limit cuts
    digest = hashlib.sha256("\0".join([redact_text(where), *parts]).encode()).hexdigest()[:8]
    return "-".join(p for p in (kind, name, digest, *map(slug, parts)) if p)[:120].rstrip("-")


def shard_rows(shards: list[dict]) -> tuple[list[dict], str]:
    """The rows of a per-shard table (failed shards first, then the slowest), and what they are."""
    if len(shards) <= MAX_ROWS:
        return shards, "Per-shard status and throughput"
    ranked = sorted(shards, key=lambda s: (s["status"] == "committed", s.get("images_per_s") or 0.0))
    return ranked[:MAX_ROWS], (f"{MAX_ROWS} of {len(shards)} shards: failed and pending first, then the slowest "
                               "(every shard is in manifest.json)")


def markdown_image(path: str, alt: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A PNG embedded in markdown, or where to find it when it is too big to embed."""
    with fsx.open_url(path, "rb", storage_options) as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        return f"*The plot is over {MAX_IMAGE_BYTES >> 20} MiB, too big to show here: open `{path}`.*\n"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})\n"
