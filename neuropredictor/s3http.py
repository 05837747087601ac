"""The HTTP session of our S3 clients: aiobotocore's, with a deadline on requests that carry a body.

aiohttp bounds each socket read (botocore's read_timeout), not a write: an upload to an endpoint that stops
reading (a hung server, a connection dropped without a reset) waits for ever, for the server's
"100 Continue" or for room in a full socket buffer, and a run writing to it hangs instead of failing.
Here such a request gets a deadline from its size; missing it is a read timeout, retried and reported
as any other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiobotocore.httpsession import AIOHTTPSession
from botocore.exceptions import ReadTimeoutError

from neuropredictor.redact import redact_text

log = logging.getLogger(__name__)

UPLOAD_RATE = 128 * 1024
"""Bytes per second: the slowest upload waited for (1 Mbit/s a request; a writer sends about 10 at once). A
request with a body gets the client's connect and read timeouts plus its size at this rate to be sent and
answered: a 4 MiB chunk 32 s more, a 64 MiB one 8.5 minutes. Loose, since a slow link cut off would fail
shards; a hung endpoint is rare and now costs a bounded wait."""


class BoundedUploads(AIOHTTPSession):
    """aiobotocore's session, each request with a body bounded in time (UPLOAD_RATE)."""

    def __init__(self, *args: Any, timeout: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, timeout=timeout, **kwargs)
        connect, read = timeout if isinstance(timeout, (list, tuple)) else (timeout, timeout)
        self._wait_s = float(connect or 60) + float(read or 60)

    async def send(self, request: Any) -> Any:
        headers = request.headers  # botocore's: case-insensitive; an aws-chunked upload states its decoded length
        size = max(int(headers.get("Content-Length") or 0), int(headers.get("X-Amz-Decoded-Content-Length") or 0))
        if not size:
            return await super().send(request)
        deadline = self._wait_s + size / UPLOAD_RATE
        try:
            return await asyncio.wait_for(super().send(request), deadline)
        except asyncio.TimeoutError as exc:  # botocore's message names the URL only: why is logged
            log.warning("no answer to a %d-byte upload to %s in %.0f s: taken for a hung endpoint (uploads slower "
                        "than %d KiB/s are)", size, redact_text(str(request.url)), deadline, UPLOAD_RATE // 1024)
            raise ReadTimeoutError(endpoint_url=request.url, error=exc) from exc
