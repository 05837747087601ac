"""Options of an encoding run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neuropredictor.encode._common import EncodingError
from neuropredictor.encode.ridge import DEFAULT_ALPHAS, _check_alphas


def parse_alphas(spec: str | Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Alpha grid from "1,10,100", "logspace:-2:6:17" (10^-2 .. 10^6, 17 values), a list, or None
    (DEFAULT_ALPHAS)."""
    if spec is None:
        return DEFAULT_ALPHAS.copy()
    if isinstance(spec, str):
        s = spec.strip()
        try:
            if s.lower().startswith("logspace:"):
                lo, hi, num = s.split(":")[1:]
                return np.logspace(float(lo), float(hi), int(num))
            return _check_alphas([float(x) for x in s.split(",") if x.strip()])
        except ValueError as e:
            raise EncodingError(f"cannot read alphas {spec!r}: use '1,10,100' or 'logspace:-2:6:17' ({e})") from e
    return _check_alphas(spec)
