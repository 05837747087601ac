"""Errors and message helpers shared by the encoding modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor.errors import NeuroPredictorError

_EXAMPLES = 5  # keys quoted per reason in reports and messages
ALL_TARGETS = "all"  # the group of every target, summarised before each ROI: no ROI may take its name


class EncodingError(NeuroPredictorError):
    """Neural data or features cannot be loaded, aligned or fitted as asked."""


class AlignmentWarning(UserWarning):
    """Some stimuli or targets were dropped while matching neural data to features."""



def _duplicates(items: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dup: dict[str, None] = {}
    for x in items:
        if x in seen:
            dup[x] = None
        seen.add(x)
    return list(dup)


def _fmt(items: Sequence[Any], n: int = _EXAMPLES) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")



def _open(path: str, mode: str, opts: Mapping | None) -> Any:
    return fsx.open_url(path, mode, opts, error=EncodingError)