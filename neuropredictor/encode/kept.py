"""Layers scored so far, kept beside the scores (OUT.partial/) until the scores are saved: a run killed
for memory at its 40th layer, or whose node was lost, scores only the layers it had not finished when
run again. A layer's file is named by a fingerprint of everything its numbers depend on (the features
store's config and rows, the neural responses, the splits, the fit options), so a run with other inputs
never picks up another's layers."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from neuropredictor import fs as fsx
from neuropredictor.encode._common import EncodingError
from neuropredictor.redact import redact_text

if TYPE_CHECKING:  # pragma: no cover
    from neuropredictor.encode.options import FitOptions
    from neuropredictor.encode.run import LayerScores, Prepared

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_FORMAT = 1  # bump when LayerScores or the fingerprint change meaning
_OURS = re.compile(r"^[0-9a-f]{16}/(?:\.)?[^/]+\.npz(?:\.[0-9a-f]{32}\.tmp)?$")  # layer files, their temporaries


def partial_url(out: str) -> str:
    """Where a run scoring into `out` keeps its finished layers."""
    return out.rstrip("/") + PARTIAL_SUFFIX


def fingerprint(prep: Prepared, opts: FitOptions) -> str | None:
    """What a layer's scores depend on, hashed; None when the features carry no config hash (a Dataset
    made in memory: nothing says its numbers are those of a rerun)."""
    config_hash = prep.ds.attrs.get("config_hash")
    if not config_hash:
        return None
    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            if isinstance(p, np.ndarray):
                h.update(str((p.dtype.str, p.shape)).encode())
                h.update(np.ascontiguousarray(p).tobytes())
            else:
                h.update(json.dumps(p, sort_keys=True, default=str).encode())
            h.update(b"\0")

    add(_FORMAT, config_hash, prep.keys, prep.rows, prep.Y, prep.usable)
    for train, test in prep.splits:
        add(train, test)
    roi = prep.neural.roi  # the chance test's groups
    add(None if roi is None else [str(x) for x in roi])
    add({k: getattr(opts, k) for k in ("inner_folds", "seed", "dtype", "solver", "permutations")},
        opts.alpha_grid)
    return h.hexdigest()[:16]


class KeptLayers:
    """The finished layers of one run (its fingerprint) under OUT.partial/."""

    def __init__(self, out: str, prep: Prepared, opts: FitOptions, storage_options: Mapping | None = None):
        self.url = partial_url(out)
        self.fs, self.root = fsx.connect(self.url, storage_options, error=EncodingError, what="scores store")
        self.key = fingerprint(prep, opts)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    @property
    def name(self) -> str:
        """The folder's URL, credentials redacted: for messages."""
        return redact_text(self.url)

    def _path(self, layer: str) -> str:
        return f"{self.root}/{self.key}/{quote(layer, safe='')}.npz"

    def load(self, layer: str) -> LayerScores | None:
        """The layer's kept scores, or None (none kept, or a file that cannot be read: it is scored again)."""
        from neuropredictor.encode.run import LayerScores

        if not self.enabled:
            return None
        try:
            data = fsx.cat_small(self.fs, self._path(layer))
        except FileNotFoundError:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                null = z["null"] if "null" in z.files else None
                return LayerScores(layer=layer, r=z["r"], r2=z["r2"], alpha=z["alpha"], null=null, **meta)
        except Exception as exc:  # a damaged file costs the layer's fit, not the run
            log.warning("layer %s: its kept scores cannot be read (%s); scoring it again", layer, exc)
            return None

    def save(self, part: LayerScores) -> None:
        if not self.enabled:
            return
        arrays = {"r": part.r, "r2": part.r2, "alpha": part.alpha}
        if part.null is not None:
            arrays["null"] = part.null
        meta = {"n_features": part.n_features, "solver": part.solver, "backend": part.backend,
                "seconds": part.seconds}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        fsx.write_bytes_atomic(self.fs, self._path(part.layer), buf.getvalue())

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
