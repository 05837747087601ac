"""The one glob dialect for layer names, wherever a user writes a pattern (`layers`, `reduce`, the
`layers` command): `*` and `?` match within one dotted segment (`blocks.*` is blocks.0 .. blocks.11, not
blocks.0.attn); `**` matches across segments (`layer1.**` is everything inside layer1)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern:
    out = []
    for part in re.split(r"(\*\*|\*|\?)", pattern):
        out.append({"**": ".*", "*": "[^.]*", "?": "[^.]"}.get(part) or re.escape(part))
    return re.compile("".join(out) + r"\Z")


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?")


def matches(pattern: str, names: Iterable[str]) -> list[str]:
    """The names the pattern matches, in their order: itself if it is a name, else by the glob rules."""
    names = list(names)
    if pattern in names:
        return [pattern]
    if not is_glob(pattern):
        return []
    regex = glob_regex(pattern)
    return [n for n in names if regex.match(n)]
