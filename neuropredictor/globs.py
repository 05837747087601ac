"""The glob dialects, one per kind of name, wherever a user writes a pattern.

Layer names (`layers`, `reduce`, the `layers` command): `*` and `?` match within one dotted segment
(`blocks.*` is blocks.0 .. blocks.11, not blocks.0.attn); `**` matches across segments (`layer1.**` is
everything inside layer1).

Model names (`models PATTERN`, every source alike): shell-style over the whole name, ignoring case (`*`
matches anything, dots, `@` and `/` included: `resnet5*`, `*vit_base*`, `ViT-B-32@*`); a pattern without a
wildcard matches names containing it (`resnet` lists every resnet).
"""

from __future__ import annotations

import fnmatch
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


def match_model_names(pattern: str | None, names: Iterable[str]) -> list[str]:
    """The model names (in their order) the pattern matches, by the model-name rule above."""
    if not pattern:
        return list(names)
    wanted = pattern.lower() if is_glob(pattern) or "[" in pattern else f"*{pattern.lower()}*"
    return [n for n in names if fnmatch.fnmatchcase(n.lower(), wanted)]
