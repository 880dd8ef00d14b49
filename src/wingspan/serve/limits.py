"""What a request may cost, bounded before the app reads it: its body's size and pace
(`BodyLimit`), the requests in flight (`Admission`) and the pixels decoded at once
(`PixelPool`)."""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from typing import BinaryIO

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

# On a refused body: uvicorn otherwise keeps the connection for the next request and reads
# the rest of this one first, discarding it (1.9 GB after the 413 of a 2 GB upload, and a
# chunked one without end); with it, it stops reading.
CLOSE = {"Connection": "close"}


async def drain(scope, receive, most: int, seconds: float) -> None:
    """Reads and drops the body of a request refused before it was read, so that the
    answer reaches a client that sends all of its body before it reads anything (urllib,
    requests): closing on an unread body reset the connection under it (a 5 MB photo got
    ConnectionResetError, not the 429 and its Retry-After). A body declared larger than
    `most`, or one that takes longer than `seconds`, is not waited for; nor one whose
    client waits to be asked for it (`Expect: 100-continue`, curl's for uploads over 1 MB):
    reading would ask, and it would upload the photo only to be refused."""
    headers = Headers(scope=scope)
    size = headers.get("content-length", "")
    if (size.isdigit() and int(size) > most) or headers.get("expect", "").lower() == \
            "100-continue":
        return
    seen, deadline = 0, time.monotonic() + seconds
    while seen <= most and (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class BodyLimit:
    """A body larger than every allowed file together is refused: from its Content-Length
    header, unread, and one without (chunked) as soon as it passes the limit. Starlette
    would otherwise spool all of it (gigabytes, say) to disk first. Raised from inside
    the form parsing, the 413 reaches the app's handler and is answered as JSON.

    An upload that stalls (nothing for `idle` seconds) or trickles (under `rate` bytes a
    second on average, once `idle` seconds have passed) is cut off with a 408: the time
    limit counts from the end of the upload, so a byte every few seconds on a few
    connections held every place in flight for good, and 429 answered everyone else."""

    def __init__(self, app, most: int, allowed: str, idle: float, rate: float,
                 drain: tuple[int, float]):
        self.app, self.most, self.allowed = app, most, allowed
        self.idle, self.rate, self.drain = idle, rate, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = Headers(scope=scope).get("content-length", "")
        if size.isdigit() and int(size) > self.most:
            await drain(scope, receive, *self.drain)
            refused = JSONResponse({"error": f"A request of {int(size)} bytes; {self.allowed}"},
                                   status_code=413, headers=CLOSE)
            return await refused(scope, receive, send)
        seen, start, done = 0, time.monotonic(), False

        async def counted():
            nonlocal seen, done
            if done:  # (then only a hang-up comes: the request may take its time)
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle)
            except asyncio.TimeoutError:
                raise StarletteHTTPException(408, f"The upload sent nothing for {self.idle:g} "
                                                  "s.", headers=CLOSE) from None
            seen += len(message.get("body", b""))
            if seen > self.most:
                raise StarletteHTTPException(413, f"A request of over {self.most} bytes; "
                                                  + self.allowed, headers=CLOSE)
            done = not message.get("more_body", False)
            took = time.monotonic() - start
            if not done and took > self.idle and seen / took < self.rate:
                raise StarletteHTTPException(408, f"The upload came at {seen / took:.0f} "
                                                  f"bytes a second, under {self.rate:g}.",
                                             headers=CLOSE)
            return message

        await self.app(scope, counted, send)


class Admission:
    """POST requests counted in flight from their first byte, and refused (429) past the
    limit before their body is read. Counted in the endpoint, once the form was in, every
    refused request had been uploaded and spooled first (627 MB for 33 files of 19 MB), and
    uploads under way counted for nothing: their number had no bound."""

    def __init__(self, app, in_flight: dict, most: int, drain: tuple[int, float]):
        self.app, self.in_flight, self.most, self.drain = app, in_flight, most, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.in_flight["n"] >= self.most:
            await drain(scope, receive, *self.drain)
            # Retry-After: what clients' retry logic (urllib3's Retry, say) waits for
            refused = JSONResponse({"error": "Too many requests in flight; try again "
                                             "shortly."}, status_code=429,
                                   headers={"Retry-After": "1", **CLOSE})
            return await refused(scope, receive, send)
        self.in_flight["n"] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight["n"] -= 1


class PixelPool:
    """How many pixels the server decodes at once. A request of 32 flat 49 MP PNGs (5 MB:
    inside every other limit) had six decoded together on the shared threads: 4.3 GB at
    its peak, and a one-photo request sent after it waited 29 s behind its queue. Each
    image now holds its header's pixels (up to the pool) while it is read and decoded, so
    large ones take turns and a small one passes them by while there is room; a file of
    more bytes than pixels (padded) holds its bytes instead (see `_decoded`)."""

    def __init__(self, size: int):
        self.size = self.free = size
        self.changed: asyncio.Condition | None = None
        self.loop = None

    @asynccontextmanager
    async def hold(self, pixels: int):
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # made on the server's loop (a test client may make more)
            self.loop, self.changed = loop, asyncio.Condition()
        pixels = min(pixels, self.size)
        async with self.changed:
            await self.changed.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            async with self.changed:
                self.free += pixels
                self.changed.notify_all()


def header_pixels(data: bytes | BinaryIO) -> int:
    """Width x height from the image's header (0 if it has none: decoding says why). From
    a file, only what Pillow reads for it (a TIFF may keep its size at its end)."""
    from wingspan.data.images import open_image

    try:
        with open_image(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - any unreadable file: _decode gives its 4xx
        return 0
