"""`wingspan serve RUN`: the model behind an HTTP API (FastAPI on uvicorn).

    POST /predict   multipart image file(s) -> top-k per level, calibrated probabilities,
                    the consistent taxonomic branch, latency
    POST /explain   one image file -> PNG: the model's view with its Grad-CAM for the
                    predicted class (or ?target=CLASS)
    GET  /          a page: drop a photo, see the top 5, the branch and the Grad-CAM
    GET  /health    liveness
    GET  /model     classes, backbone, metrics, training date
    GET  /docs      OpenAPI

Requests that arrive together are batched: each waits up to `batch_wait_ms` for others,
and one forward pass on the engine the policy chose serves them all. Limits, each a 4xx
with a JSON error while the server keeps serving: upload size (413), what the bytes are
(sniffed by Pillow, not the extension: 415), the pixel budget (413), requests in flight
(429) and a time limit (504). In a request of several files, one that fails gets its
error in its place in the answer and the others are answered.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import io
import math
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Annotated, BinaryIO

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from wingspan.config import ServeLimits
from wingspan.data.images import max_pixels
from wingspan.errors import WingspanError, counted, first_line, some
from wingspan.inference import Predictor, run_dir_of
from wingspan.predict import answer_for, deciding_score


class _Batcher:
    """Collects preprocessed images from concurrent requests into one forward pass."""

    def __init__(self, predictor: Predictor, limits: ServeLimits):
        self.predictor, self.limits = predictor, limits
        self.queue: asyncio.Queue | None = None
        self.loop = None

    async def run(self, image: torch.Tensor
                  ) -> tuple[dict[str, np.ndarray], dict[str, float] | None]:
        """The image's outputs per level, and its unknown scores (None without them)."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # started on the server's loop (a test client may make more)
            self.loop, self.queue = loop, asyncio.Queue()
            loop.create_task(self._serve(self.queue))
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((image, done))
        return await done

    async def _serve(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            deadline = time.perf_counter() + self.limits.batch_wait_ms / 1000
            while len(batch) < self.limits.batch_size:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [item for item in batch if not item[1].done()]  # drop cancelled requests
            if not batch:
                continue
            x = torch.stack([image for image, _ in batch])
            try:
                outputs, scores = await asyncio.to_thread(self.predictor.forward_with_scores, x)
            except Exception as e:  # noqa: BLE001 - every waiting request hears of it
                for _, done in batch:
                    if not done.done():
                        done.set_exception(e)
                continue
            for i, (_, done) in enumerate(batch):
                if not done.done():
                    done.set_result(({lv: o[i].float().numpy() for lv, o in outputs.items()},
                                     {lv: float(v[i]) for lv, v in scores.items()}
                                     if scores else None))


class ApiError(BaseModel):
    """Every error the API answers: {"error": what went wrong}."""

    error: str


# What each endpoint can answer, for the OpenAPI schema (/openapi.json). A request of
# several files is refused for a file only when none of them can be read.
PREDICT_ANSWER = ('{"predictions": [one per file, in order], "latency_ms"}. Each prediction '
                  'is {"file", "top": {level: [{"class", "probability"}]}, "branch", "answer", '
                  '"known_level", "unknown_score", "threshold", "score_level"}; a file that '
                  'cannot be read is {"file", "error", "status"} in its place (its 4xx below), '
                  "and the others are answered.")
ERRORS = {code: {"model": ApiError, "description": what} for code, what in (
    (413, "a file (the only one, or every one), the request or the pixels over their "
          "limits"),
    (415, "bytes that are not a picture of a known format (the only file, or every one)"),
    (422, "a malformed request (no files, an unknown target class), or an image cut short "
          "(the only file, or every one)"),
    (408, "an upload that stalled, or came slower than the server's least rate"),
    (429, "too many requests in flight; try again shortly"),
    (504, "no answer within the time limit"))}


# How often a request being answered checks that its client is still there.
HANG_UP_POLL_S = 0.1
# On a refused body: uvicorn otherwise keeps the connection for the next request and reads
# the rest of this one first, discarding it (1.9 GB after the 413 of a 2 GB upload, and a
# chunked one without end); with it, it stops reading.
CLOSE = {"Connection": "close"}


async def _drain(scope, receive, most: int, seconds: float) -> None:
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


class _BodyLimit:
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
            await _drain(scope, receive, *self.drain)
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


class _Admission:
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
            await _drain(scope, receive, *self.drain)
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


class _PixelPool:
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


def _header_pixels(data: bytes | BinaryIO) -> int:
    """Width x height from the image's header (0 if it has none: decoding says why). From
    a file, only what Pillow reads for it (a TIFF may keep its size at its end)."""
    from wingspan.data.images import open_image

    try:
        with open_image(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - any unreadable file: _decode gives its 4xx
        return 0


def create_app(model: str | Path, limits: ServeLimits | None = None, device: str = "auto",
               precision: str = "auto", runtime: str = "auto"):
    """The FastAPI application serving `model` (a run folder or a bundle)."""
    limits = limits or ServeLimits()
    predictor = Predictor(model, device=device, batch_size=limits.batch_size, workers=0,
                          precision=precision, runtime=runtime)
    view = predictor.views(tta=False)[0]
    # One pass at the largest batch before serving: the engine's buffers grow to it now,
    # not under the first burst of requests (memory then stays flat while serving).
    predictor.forward(torch.zeros(limits.batch_size, 3, predictor.size, predictor.size))
    batcher = _Batcher(predictor, limits)
    in_flight = {"n": 0}
    decoding = _PixelPool(limits.decode_pixels)
    # Grad-CAM on threads of its own: one that outlives its 504 (a thread cannot be
    # stopped) then holds one of these, not one of the pool that decodes /predict's images.
    explainers = ThreadPoolExecutor(limits.explain_threads, thread_name_prefix="wingspan-explain")
    manifest = predictor.manifest
    # The run's name, not its path: the schema is for anyone who reaches the server.
    named = run_dir_of(Path(predictor.bundle)) or Path(predictor.bundle)
    app = FastAPI(title="wingspan", description=f"Predictions of the model '{named.name}'")
    most = limits.max_files * (limits.max_bytes + 4096)  # every file, with its part headers
    drain = (limits.drain_bytes, limits.drain_s)
    app.add_middleware(_BodyLimit, most=most,
                       allowed=f"at most {most} ({counted(limits.max_files, 'file')} of "
                               f"{limits.max_bytes} bytes, each with 4096 bytes of form "
                               "headers).", idle=limits.upload_idle_s,
                       rate=limits.min_upload_rate, drain=drain)
    app.add_middleware(_Admission, in_flight=in_flight, most=limits.max_in_flight,
                       drain=drain)
    app.state.predictor = predictor

    # Every error as {"error": ...}, not {"detail": ...}: ours, Starlette's own (404, too
    # many form parts) and a request without the form FastAPI expects (422).
    @app.exception_handler(StarletteHTTPException)
    async def as_json(_, e: StarletteHTTPException):
        if e.status_code == 400 and str(e.detail).startswith("Too many files"):
            # Starlette's form parser stops at its own count (1000) before our check runs.
            return JSONResponse({"error": f"{e.detail[:-1]} in its form parser; at most "
                                          f"{limits.max_files} files in one request."},
                                status_code=413)
        return JSONResponse({"error": e.detail}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_as_json(request: Request, e: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        # No file where one is expected (no body, JSON, a field named 'image', text): the
        # field to send it in, which FastAPI's 'body.files: Field required' leaves to guess.
        fields = {err["loc"][1] for err in e.errors() if err["loc"][:1] == ("body",)
                  and len(err["loc"]) > 1}
        url = str(request.url.replace(query=None))
        how = "".join(f" Send the image as a file in the multipart/form-data field '{f}', "
                      f"e.g. curl -F {f}=@photo.jpg {url}" for f in sorted(fields))
        return JSONResponse({"error": f"Malformed request ({where}).{how}"}, status_code=422)

    page = (Path(__file__).parent / "serve_page.html").read_text(encoding="utf-8")

    # HEAD too: uptime monitors probe with it (a GET route alone answers HEAD with 405)
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse,
                   include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "in_flight": in_flight["n"]}

    # (HEAD apart, out of the schema: one route of both gives OpenAPI one operation id twice)
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    adapted = manifest.get("training", {}).get("adapted")

    @app.get("/model")
    def model_info() -> dict:
        return {"classes": manifest["classes"], "backbone": manifest["model"]["backbone"],
                "metrics": manifest.get("metrics", {}).get("best"),
                "calibration": {k: v for k, v in (manifest.get("calibration") or {}).items()
                                if k != "photo_sums"} or None,  # (hashes: noise here)
                # When training wrote it (calibrate rewrites the folder later); a bundle
                # from before this was recorded: its folder's time.
                "trained": manifest.get("training", {}).get("finished") or time.strftime(
                    "%Y-%m-%d %H:%M UTC", time.gmtime(Path(predictor.bundle).stat().st_mtime)),
                "engine": predictor.policy.describe(),
                # an adapted run: from which run (its name, as the title: not where it
                # lies), on how many photos (its "trained" and "metrics" are that run's)
                "adapted": adapted and {**adapted, "adapted_from": re.split(
                    r"[\\/]", str(adapted.get("adapted_from", "")))[-1]},  # (a Windows one too)
                # what "unknown" in an answer means: the score, and each level's threshold
                "unknown": ({"score": predictor.unknown_score, "rate": predictor.unknown.rate,
                             "thresholds": predictor.thresholds}
                            if predictor.unknown else None)}

    # (HEAD as for /health: a monitor that checks the model is loaded got 405)
    app.add_api_route("/model", model_info, methods=["HEAD"], include_in_schema=False)

    @contextmanager
    def time_limited():
        """A request answered 504 past the time limit, whichever endpoint it is. (It was
        counted in flight, or refused, as it arrived: `_Admission`.)"""
        try:
            yield
        except asyncio.TimeoutError as e:
            raise HTTPException(504, f"No answer within {limits.timeout_s:g} s.") from e

    @app.post("/predict", responses={200: {"description": PREDICT_ANSWER}, **ERRORS})
    async def predict(request: Request, files: Annotated[list[UploadFile], File()]) -> dict:
        start = time.perf_counter()
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} files in one request; at most "
                                     f"{limits.max_files}.")
        with time_limited():
            results = await _unless_gone(request, asyncio.wait_for(_each(files),
                                                                   limits.timeout_s))
        return {"predictions": results, "latency_ms": round(1000 * (time.perf_counter()
                                                                    - start), 1)}

    @app.post("/explain", response_class=Response,
              responses={200: {"content": {"image/png": {}}}, **ERRORS,
                         501: {"model": ApiError, "description": "a model Grad-CAM cannot "
                               "draw (several feature maps)"}})
    async def explain_one(file: Annotated[list[UploadFile], File()],
                          target: str | None = None):
        if len(file) != 1:  # one overlay per request: the rest would be dropped unseen
            raise HTTPException(422, f"{len(file)} files: /explain draws one image at a time.")
        file = file[0]
        if target is not None and target not in predictor.classes:
            more = " (GET /model lists them)" if len(predictor.classes) > 10 else ""
            raise HTTPException(422, f"Unknown class '{target}': target names one of the "
                                     f"model's {predictor.level} classes: "
                                     f"{some(predictor.classes, 10)}{more}.")
        with time_limited():
            start = time.perf_counter()  # one time limit for the decoding and the Grad-CAM
            decode = asyncio.ensure_future(_decoded(file))
            try:
                x = await asyncio.wait_for(asyncio.shield(decode), limits.timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                decode.cancel()  # (its thread, once started, goes on: see _decoded)
                _in_flight_until_done(decode)
                raise
            work = asyncio.get_running_loop().run_in_executor(
                explainers, _explain_png, predictor, x, target)
            left = max(0.0, limits.timeout_s - (time.perf_counter() - start))
            try:
                png = await asyncio.wait_for(asyncio.shield(work), left)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                _in_flight_until_done(work)
                raise
            except WingspanError as e:  # a model Grad-CAM cannot draw (CrossViT's two maps)
                raise HTTPException(501, e.message) from e
        return Response(png, media_type="image/png")

    async def _unless_gone(request: Request, answer):
        """`answer` awaited, or cancelled as the client hangs up: a request of 16 large
        photos dropped after 1 s went on decoding for 12 s, and slowed every other
        request meanwhile (a client that times out and retries would multiply it). The
        decodes under way end first, holding their place in flight (`_each`)."""
        work = asyncio.ensure_future(answer)
        gone = asyncio.ensure_future(_hung_up(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # (this request itself cancelled: shutting down)
            work.cancel()
            raise
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            with suppress(asyncio.CancelledError):
                await work
            # (nobody reads the answer; 499 is nginx's "client closed request")
            raise HTTPException(499, "The client closed the connection.")
        return work.result()

    async def _hung_up(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(HANG_UP_POLL_S)

    def _prepare(name: str | None, data: bytes) -> torch.Tensor:
        return view(_decode(name, data, predictor.draft))

    def _in_flight_until_done(work: asyncio.Future) -> None:
        """A thread cannot be stopped: work answered 504 (or cancelled) keeps a place in
        flight until it ends, so that slow requests cannot pile up past the limit."""
        in_flight["n"] += 1
        work.add_done_callback(lambda _: in_flight.update(n=in_flight["n"] - 1))

    async def _decoded(upload: UploadFile) -> torch.Tensor:
        """The upload read and decoded (on worker threads, so that the event loop keeps
        accepting), in turn with the other requests' images by what each holds in memory:
        the larger of its header's pixels and its bytes. Read before their turn, 32 files
        padded to 20 MB were held at once (650 MB a request), whatever their pixels."""
        upload.file.seek(0, os.SEEK_END)  # (Starlette has spooled it to memory or disk)
        size = upload.file.tell()
        if size > limits.max_bytes:
            raise HTTPException(413, f"{upload.filename}: over {limits.max_bytes} bytes "
                                f"({limits.max_bytes / 2**20:.3g} MB), the most this server takes "
                                "(wingspan serve --max-upload-mb).")
        upload.file.seek(0)
        # Pixels at most the budget: over it, an image is refused from its header or (a
        # JPEG) decoded reduced to fit, so a 400 MP bomb need not wait for the whole pool.
        # (Read from the spooled file, on a thread: it may be on disk.)
        pixels = min(await asyncio.to_thread(_header_pixels, upload.file), max_pixels())
        async with decoding.hold(max(pixels, size)):
            await upload.seek(0)
            data = await upload.read()
            let_go = threading.Event()

            def prepared() -> torch.Tensor | None:  # (not begun when let go: never begun)
                return None if let_go.is_set() else _prepare(upload.filename, data)

            work = asyncio.ensure_future(asyncio.to_thread(prepared))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # Answered 504 or cancelled, a thread that has begun decodes on: its pixels
                # stay held until it ends (given back at once, the next requests' decodes
                # piled up past the pool: 6 of 49 MP at once in a pool of 2).
                let_go.set()
                await asyncio.wait([work])
                raise

    async def _each(files: list[UploadFile]) -> list[dict]:
        """Every file's answer, in order. A file that cannot be read gets its error in its
        place ({"file", "error", "status"}) and the others their answers, as `wingspan
        predict` goes on past a broken photo; only when no file can be read is the request
        itself refused, with the first file's status."""
        tasks = [asyncio.ensure_future(_one(f)) for f in files]
        try:  # (wait, not gather: a gather cancelled waits for its tasks, and a 504 for
            # the decodes under way)
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task.done() and task.exception():
                    raise task.exception()
            answers = [task.result() for task in tasks]
        except BaseException:  # a time limit or a fault of ours: the others are not
            pending = [task for task in tasks if not task.done()]
            for task in pending:  # computed for nothing (3.10 has no TaskGroup)
                task.cancel()
            if pending:  # (decodes under way end first)
                _in_flight_until_done(asyncio.gather(*pending, return_exceptions=True))
            raise
        failed = [a for a in answers if "error" in a]
        if failed and len(failed) == len(answers):
            what = "; ".join(a["error"].rstrip(".") for a in failed[:3]) + (
                f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
            raise HTTPException(failed[0]["status"], failed[0]["error"] if len(failed) == 1
                                else f"None of the {len(failed)} files could be read: {what}.")
        return answers

    async def _one(upload: UploadFile) -> dict:
        try:
            x = await _decoded(upload)
        except HTTPException as e:  # this file's fault: the request's other files go on
            return {"file": upload.filename, "error": e.detail, "status": e.status_code}
        outputs, scores = await batcher.run(x)
        return _answer(predictor, upload.filename, outputs, scores, limits.top_k)

    return app


def _decode(name: str | None, data: bytes, draft: int | None = None):
    """Pillow decides what the bytes are (not the file name), within the pixel budget; a
    JPEG is decoded reduced to `draft` (and to fit the budget), as `wingspan predict`
    does."""
    from PIL import UnidentifiedImageError

    from wingspan.data.images import (
        ImageTooLarge,
        _unread_kind,
        open_image,
        open_rgb,
        signature_format,
    )

    try:  # the header only: a bomb is refused by the pixel budget below, before decoding
        with open_image(io.BytesIO(data)):
            pass
    except UnidentifiedImageError as e:
        kind = _unread_kind(io.BytesIO(data))  # an iPhone's HEIC, say: as predict says it
        cut = None if kind or not data else signature_format(io.BytesIO(data))
        if cut:  # stopped within the header: what it is, and why it cannot be read
            raise HTTPException(422, f"{name}: a {cut} cut short or damaged within its "
                                "header.") from e
        raise HTTPException(415, f"{name}: " + (
            "the file is empty (0 bytes)." if not data else
            f"{kind}. Convert it to JPEG or PNG." if kind else
            "not a JPEG, PNG, TIFF, WebP, GIF or BMP image, whatever its name says.")) from e
    except OSError as e:  # an image, cut off within its header ("Truncated File Read")
        raise HTTPException(422, f"{name}: cannot be read ({e}): the file is cut short or "
                            "damaged.") from e
    except (SyntaxError, ValueError) as e:  # (a PNG's text chunk that inflates past Pillow's
        # limit: "Decompressed Data Too Large"; it was a 500 for the whole request)
        raise HTTPException(422, f"{name}: cannot be read ({e}).") from e
    # open_rgb holds to the pixel budget (from the header, before decoding), and refuses a
    # strip whose resize to `draft` would outgrow it (a 1 x 40000 PNG of a few hundred bytes)
    try:
        return open_rgb(io.BytesIO(data), draft, name=name or "the upload")
    except ImageTooLarge as e:  # the server's budget, which its own command line raises
        raise HTTPException(413, e.message + (" Shrink it, or start the server with a larger "
                                              "wingspan serve --max-pixels."
                                              if "too long and thin" not in e.message else
                                              " Crop it to the part that shows the subject.")
                            ) from e
    except WingspanError as e:
        raise HTTPException(422, e.message) from e


def _explain_png(predictor: Predictor, x: torch.Tensor, target: str | None) -> bytes:
    """The overlay `wingspan explain` writes, as PNG bytes."""
    from wingspan.explain import explain_view, model_view, save_overlay

    explained, title = explain_view(predictor, x, target)
    return save_overlay(model_view(x, predictor), explained.heatmap, title, None)


def _answer(predictor: Predictor, name: str | None, outputs: dict[str, np.ndarray],
            scores: dict[str, float] | None, top_k: int) -> dict:
    logits = outputs[predictor.level]
    probs = torch.softmax(torch.from_numpy(logits) / predictor.temperature, 0).numpy()
    order = probs.argsort()[::-1][:top_k]
    levels = {}
    if predictor.taxonomy:  # each coarser level's classes, their probabilities summed up
        marginals = predictor.taxonomy.marginals(probs[None])
        for lv in predictor.taxonomy.levels[:-1]:
            p = marginals[lv][0]
            levels[lv] = [{"class": predictor.taxonomy.classes[lv][i],
                           "probability": float(p[i])} for i in p.argsort()[::-1][:top_k]]
    levels[predictor.level] = [{"class": predictor.classes[i], "probability": float(probs[i])}
                               for i in order]
    answer = {"file": name, "top": levels}
    # The class at the finest level the image passes the unknown threshold at, else
    # "unknown"; the closest class stays in `top`.
    branch, level, said = answer_for(predictor, probs, predictor.known_level(scores))
    if branch:
        answer["branch"] = [{"level": lv, "class": c, "probability": p} for lv, c, p in branch]
    answer["known_level"], answer["answer"] = level, said
    answer.update(deciding_score(predictor, scores))
    return answer


@contextmanager
def serving_in_background(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` from a thread of this process while the block runs; yields its base URL.
    Port 0 takes a free one. For tests, benchmarks and notebooks."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="wingspan-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise WingspanError(f"The server could not start on {host}:{port}.")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# glibc gives threads that allocate at once arenas of their own (up to 8 per core), and
# photos of every size decoded on the request threads leave them fragmented: over 5
# minutes of load the server's RSS went 1230 -> 1474 MB without levelling off; with 2
# arenas, 1120 -> 1223 MB, flat from the third minute, at the same throughput
# (bench/serve_load.py --clients 8 8 8 8 8, 2-core EPYC).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (not where MALLOC_ARENA_MAX is set, or
    without glibc); True if capped. Arenas made before the call stay."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # musl and other C libraries: leave it be
        return False


def check_port(host: str, port: int) -> None:
    """A WingspanError, in one line, where the server could not listen (uvicorn would log
    the error and exit with status 3): bound as uvicorn binds (asyncio's create_server),
    then let go. Before the model loads, so that a taken port is said at once."""

    async def bind() -> None:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(bind())
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise WingspanError(f"Port {port} is in use on {host} (another server listens "
                                "there): pick another with --port.") from e
        raise WingspanError(f"Cannot listen on {host}:{port}: {first_line(e)}",
                            hint="Check --host (an address of this machine) and --port "
                            "(below 1024 needs root).") from e


def _this_machine_only(host: str) -> bool:
    """A loopback address or name: nothing but this machine can connect."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000,
          limits: ServeLimits | None = None, device: str = "auto", precision: str = "auto",
          runtime: str = "auto", access_log: bool = True) -> None:
    import uvicorn

    check_port(host, port)
    limit_malloc_arenas()
    # uvicorn.Server, not uvicorn.run, which swallows the Ctrl-C it passes on once shut
    # down: the command then ended 0, where every other one stopped so ends 130.
    app = create_app(model, limits, device, precision, runtime)
    # What answers, said as predict's and evaluate's engine line says it (a lossy engine
    # left out for this model among it), before uvicorn's own lines.
    predictor = app.state.predictor
    print(f"Serving {predictor.bundle} ({len(predictor.classes)} classes); "
          f"{predictor.policy.describe()}", file=sys.stderr, flush=True)
    if not _this_machine_only(host):
        print(f"Warning: --host {host} lets other machines reach the server, and it asks no "
              "one who they are: anyone who can reach the port can use the model. Put it "
              "behind a proxy that does (nginx, Caddy), or on a network you trust.",
              file=sys.stderr, flush=True)
    # On SIGTERM, requests in flight get their time limit to finish, then the server ends:
    # without a bound, one client stalled mid-upload kept it waiting for ever (docker stop,
    # systemd and Kubernetes then kill it, and every request in flight with it).
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=access_log,
        timeout_graceful_shutdown=math.ceil((limits or ServeLimits()).timeout_s) + 5))
    server.run()
    if not server.started:  # (uvicorn has logged why)
        raise WingspanError(f"The server could not start on {host}:{port}.")
