"""Credentials never reach a log, a manifest, a commit record or an artifact: everything written next
to the data, or shown to a user, goes through `redact` / `redact_text` first."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

# Name parts that mark a value as a credential. Matching is per word of the key name (split on
# `_`, `-`, `.`, spaces and camelCase), so `aws_secret_access_key`, `hfToken` and s3fs's bare `key`
# are caught while harmless names such as `monkey` or `num_tokens` are left alone.
_SECRET_WORDS = {"key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials",
                 "apikey", "accesskey", "secretkey", "authorization", "connection_string", "connectionstring"}
# Fields whose mappings are keyed by layer or array names, not option names: a layer named `key` (attention's
# key projection) or `token_mixer` holds no credential, and its checksum or reduction must survive.
_KEYED_BY_DATA = frozenset({"checksums", "reductions"})
# `scheme://user:password@host` and secret-looking query parameters (presigned URLs) inside strings.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*):[^/@\s]+@")
_QUERY_SECRET = re.compile(  # `sig`: an Azure SAS URL's signature
    r"(?P<head>[?&](?:[^=&#\s]*(?:signature|token|secret|password|credential|key)[^=&#\s]*|sig)=)[^&#\s]*",
    re.IGNORECASE,
)


# keys inside an Azure connection string (`...;AccountKey=...;`), or a SAS signature written out
_CONNECTION_SECRET = re.compile(r"(?P<head>\b(?:AccountKey|SharedAccessKey|SharedAccessSignature)=)[^;\s]*",
                                re.IGNORECASE)


def secret_name_pattern() -> str:
    """A JSON-schema `pattern` (no regex flags: JavaScript reads it too) matching names that contain a secret
    word anywhere, in any case: stricter than `is_secret_name` (`monkey` matches), for refusing option
    names outright where credentials must never be given."""
    def any_case(word: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)

    # a word containing another adds nothing to a substring match (accesskey: key)
    words = sorted(w for w in _SECRET_WORDS if not any(o != w and o in w for o in _SECRET_WORDS))
    return "|".join(any_case(w) for w in words)


def is_secret_name(name: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    parts = {p.lower() for p in re.split(r"[^A-Za-z0-9]+", words) if p}
    return bool(parts & _SECRET_WORDS) or name.lower() in _SECRET_WORDS


def _is_blank(value: Any) -> bool:
    # An unset credential (None / "") is kept as is: it shows that none was given, and leaks nothing.
    return value is None or (isinstance(value, str) and value == "")


def redact_text(text: str) -> str:
    """Remove passwords from URLs (`s3://user:pw@host` -> `s3://user:***@host`) and secret query values."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)
    text = _CONNECTION_SECRET.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('head')}{REDACTED}", text)


def redact(obj: Any, names_are_data: bool = False) -> Any:
    """A copy of obj with credential values replaced by "***".

    Values of dict keys whose name contains one of key/secret/token/password/credential as a word
    (case-insensitive, any nesting depth, inside lists too) are replaced, except in mappings keyed by
    layer or array names (`names_are_data`: the fields in `_KEYED_BY_DATA`); strings everywhere lose URL
    passwords and secret query parameters. Mappings become dicts and tuples become lists, which is what
    they turn into in JSON anyway.
    """
    if isinstance(obj, Mapping):
        return {str(k): (REDACTED if not names_are_data and is_secret_name(str(k)) and not _is_blank(v)
                         else redact(v, str(k) in _KEYED_BY_DATA)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
