"""User-facing errors. Each message names the problem and how to fix it."""

from __future__ import annotations

from neuropredictor.redact import redact_text


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when empty), at most `limit` characters:
    what a one-line error quotes of a library's multi-line message."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= limit else line[:limit] + " ..."


class NeuroPredictorError(Exception):
    """Base class for errors a user can act on (bad spec, missing layer, unreachable corpus...). Its message is
    shown, logged, and kept in failure records and Prefect states: credentials in it are redacted here, once,
    whichever message quoted a URL."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))


class ModelSpecError(NeuroPredictorError):
    """The model spec cannot be parsed or names a model that does not exist."""


class WeightsUnavailableError(NeuroPredictorError):
    """Pretrained weights could not be obtained (offline, missing file, incompatible checkpoint)."""


class LayerNotFoundError(NeuroPredictorError):
    """A requested layer name or pattern matches no module of the model."""


class ReductionError(NeuroPredictorError):
    """A reduction is unknown or does not fit the layer's output shape."""


class CorpusError(NeuroPredictorError):
    """The corpus cannot be listed, read or counted."""


class StoreError(NeuroPredictorError):
    """The output store cannot be created, opened or written."""


class ConfigMismatchError(StoreError):
    """The output store exists and was made with a different configuration."""


class Interrupted(NeuroPredictorError):
    """The run was asked to stop (Ctrl-C): committed shards stay committed; the same call resumes."""
