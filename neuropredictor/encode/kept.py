"""Layers scored so far, kept beside the scores (OUT.partial/) until the scores are saved: a run killed
for memory at its 40th layer, or whose node was lost, scores only the layers it had not finished when
run again. A run's layers lie under a fingerprint of everything their numbers depend on (`run.fingerprint`:
the features store's config and rows, the neural responses, the splits, the fit options), so a run with
other inputs never picks up another's layers."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import numpy as np

from neuropredictor import fs as fsx
from neuropredictor.encode._common import EncodingError
from neuropredictor.redact import redact_text

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_OURS = re.compile(r"^[0-9a-f]{16}/(?:\.)?[^/]+\.npz(?:\.[0-9a-f]{32}\.tmp)?$")  # layer files, their temporaries


def partial_url(out: str) -> str:
    """Where a run scoring into `out` keeps its finished layers."""
    return out.rstrip("/") + PARTIAL_SUFFIX


class KeptLayers:
    """The finished layers of one run under OUT.partial/KEY/: KEY is the run's fingerprint, None to keep
    nothing (inputs that nothing identifies)."""

    def __init__(self, out: str, key: str | None, storage_options: Mapping | None = None):
        self.url = partial_url(out)
        self.fs, self.root = fsx.connect(self.url, storage_options, error=EncodingError, what="scores store")
        self.key = key

    @property
    def enabled(self) -> bool:
        return self.key is not None

    @property
    def name(self) -> str:
        """The folder's URL, credentials redacted: for messages."""
        return redact_text(self.url)

    def _path(self, layer: str) -> str:
        return f"{self.root}/{self.key}/{quote(layer, safe='')}.npz"

    def load(self, layer: str) -> dict[str, Any] | None:
        """The layer's kept scores (`LayerScores`' fields), or None (none kept, or a file that cannot be
        read: it is scored again)."""
        if not self.enabled:
            return None
        try:
            data = fsx.cat_small(self.fs, self._path(layer))
        except FileNotFoundError:
            return None
        except Exception as exc:  # unreadable (OUT.partial a file, no access): the layer is scored
            log.warning("layer %s: kept scores cannot be looked up in %s (%s); scoring it", layer, self.name, exc)
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "meta"}
                return {"layer": layer, **arrays, **json.loads(str(z["meta"]))}
        except Exception as exc:  # a damaged file costs the layer's fit, not the run
            log.warning("layer %s: its kept scores cannot be read (%s); scoring it again", layer, exc)
            return None

    def save(self, fields: Mapping[str, Any]) -> None:
        """Keep a layer's scores: `LayerScores`' fields (arrays, and JSON-able scalars)."""
        if not self.enabled:
            return
        arrays = {k: v for k, v in fields.items() if isinstance(v, np.ndarray)}
        meta = {k: v for k, v in fields.items() if k != "layer" and v is not None and k not in arrays}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        fsx.write_bytes_atomic(self.fs, self._path(fields["layer"]), buf.getvalue())

    def clear(self) -> None:
        """Remove OUT.partial once the scores are saved: only when it holds nothing but layer files (a
        folder of the same name with anything else in it is the user's, and stays)."""
        paths = fsx.listing(self.fs, self.root, recursive=True)
        if not paths:
            return
        prefix = self.root.rstrip("/") + "/"
        if all(_OURS.match(p[len(prefix):] if p.startswith(prefix) else p) for p in paths):
            fsx.remove_tree(self.fs, self.root)
        else:
            log.warning("%s holds files other than kept layer scores; left as it is", self.name)
