"""The HTTP session of our S3 clients: aiobotocore's, with uploads that stop moving cut off.

aiohttp bounds each socket read (botocore's read_timeout), not a write: an upload to an endpoint that stops
reading (a hung server, a connection dropped without a reset) waited for ever, for the server's
"100 Continue" or for room in a full socket buffer, and a run writing to it hung instead of failing. Here a
PUT whose body nobody takes for the client's connect and read timeouts together is a read timeout, retried
and reported as any other. A slow upload that keeps moving is never cut, whatever its size: over plain HTTP,
where aiohttp takes 64 KiB at a time; over HTTPS, botocore's chunks of 1 MiB must each go within those timeouts
and 32 s more (about 7 KiB/s with s3fs's timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import io
import logging
import time
from typing import Any

from aiobotocore.httpsession import AIOHTTPSession
from botocore.exceptions import ReadTimeoutError

from neuropredictor.redact import redact_text

log = logging.getLogger(__name__)

_LOOK_S = 0.5  # how often a running upload's progress is looked at


class _Moving(io.RawIOBase):
    """An upload's body, noting when aiohttp last took bytes of it (it takes more as the socket drains)."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self.body = body
        self.moved = time.monotonic()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.body.seekable()

    def read(self, size: int = -1) -> bytes:
        data = self.body.read(size)
        self.moved = time.monotonic()
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:  # botocore rewinds the body to retry
        self.moved = time.monotonic()
        return self.body.seek(offset, whence)

    def tell(self) -> int:
        return self.body.tell()


class _MovingChunks:
    """An aws-chunked upload's body (over HTTPS botocore sends the checksum after the data, in chunks of 1 MiB),
    noting when aiohttp last took a chunk of it; anything else is the body's own."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.moved = time.monotonic()

    def __aiter__(self) -> _MovingChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.body.__anext__()
        self.moved = time.monotonic()
        return chunk

    def __getattr__(self, name: str) -> Any:  # seek (a retry rewinds it), read, ...
        if name == "body":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.body, name)


_CHUNK_WAIT_S = 32.0  # more stillness allowed between aws-chunked chunks: 1 MiB at 32 KiB/s


class BoundedUploads(AIOHTTPSession):
    """aiobotocore's session; a PUT whose body stops moving for the connect and read timeouts is cut off."""

    def __init__(self, *args: Any, timeout: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, timeout=timeout, **kwargs)
        connect, read = timeout if isinstance(timeout, (list, tuple)) else (timeout, timeout)
        self._still_s = float(connect or 60) + float(read or 60)

    async def send(self, request: Any) -> Any:
        body, still_s = request.body, self._still_s
        if request.method != "PUT" or body is None:
            return await super().send(request)  # no upload: aiohttp's read timeout bounds it
        if isinstance(body, io.IOBase) and not isinstance(body, _Moving):  # plain HTTP: read 64 KiB at a time
            body = request.body = _Moving(body)
        elif hasattr(body, "__anext__") and not isinstance(body, _MovingChunks):  # HTTPS: aws-chunked
            body = request.body = _MovingChunks(body)
        if isinstance(body, _MovingChunks):
            still_s += _CHUNK_WAIT_S
        elif not isinstance(body, _Moving):
            return await super().send(request)  # bytes: no progress to watch (botocore sends none for a PUT)
        body.moved = time.monotonic()  # a retry sends the same request again, its body rewound
        sending = asyncio.ensure_future(super().send(request))
        try:
            while True:
                done, _ = await asyncio.wait({sending}, timeout=_LOOK_S)
                if done:
                    return sending.result()
                if time.monotonic() - body.moved > still_s:
                    break
        finally:  # also when our caller is cancelled: the upload must not run on, holding its connection
            if not sending.done():
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sending
        log.warning("an upload to %s took no bytes for %.0f s: taken for a hung endpoint",
                    redact_text(str(request.url)), still_s)  # botocore's message names the URL only
        raise ReadTimeoutError(endpoint_url=request.url, error="upload stalled")


@functools.cache
def config_options() -> dict[str, Any]:
    """The AioConfig options that make a client use BoundedUploads: none with an aiobotocore too old to take a
    session class (its uploads then wait as they did)."""
    from aiobotocore.config import AioConfig

    takes = "http_session_cls" in inspect.signature(AioConfig.__init__).parameters
    return {"http_session_cls": BoundedUploads} if takes else {}
