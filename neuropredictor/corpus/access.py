"""Reaching a corpus: its filesystem, and errors that name the URL, what went wrong and what to do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuropredictor import fs as fsx
from neuropredictor.errors import CorpusError
from neuropredictor.redact import redact_text


def connect(url: str, storage_options: Mapping | None, fresh: bool = True) -> tuple[Any, str]:
    """Filesystem + path of a corpus URL; fresh by default, so listings are never stale."""
    return fsx.connect(url, storage_options, fresh=fresh, error=CorpusError, what="corpus")


def access_error(url: str, exc: BaseException, what: str = "corpus") -> CorpusError:
    """A CorpusError for a failed access to url. Never includes credentials."""
    if isinstance(exc, CorpusError):
        return exc
    url = redact_text(url)
    if isinstance(exc, FileNotFoundError):
        return CorpusError(
            f"{what} {url} does not exist: check the path, bucket and prefix "
            "(a corpus is a folder of images, a folder of .tar shards, a brace pattern such as "
            "dir/shard-{000000..000009}.tar, or .tar URLs).")
    if isinstance(exc, PermissionError):
        return CorpusError(
            f"access to {what} {url} was denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or storage_options key/secret) and the permissions.")
    return CorpusError(fsx.unreachable(url, exc, what))
