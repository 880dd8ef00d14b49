"""The FastAPI application: its endpoints (/, /health, /model, /predict, /explain), its
errors as JSON, and what an answer holds."""

from __future__ import annotations

import asyncio
import io
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from wingspan.config import ServeLimits
from wingspan.data.images import max_pixels
from wingspan.errors import WingspanError, counted, some
from wingspan.inference import Predictor, run_dir_of
from wingspan.predict import answer_for, deciding_score
from wingspan.serve.batching import Batcher
from wingspan.serve.limits import Admission, BodyLimit, PixelPool, header_pixels


class ApiError(BaseModel):
    """Every error the API answers: {"error": what went wrong}."""

    error: str


# What each endpoint can answer, for the OpenAPI schema (/openapi.json). A request of
# several files is refused for a file only when none of them can be read.
PREDICT_ANSWER = ('{"predictions": [one per file, in order], "latency_ms"}. Each prediction '
                  'is {"file", "answer", "predicted", "probability", "top": {level: '
                  '[{"class", "probability"}]}, "branch", "known_level", "unknown_score", '
                  '"threshold", "score_level"}; a file that '
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
    batcher = Batcher(predictor, limits)
    in_flight = {"n": 0}
    decoding = PixelPool(limits.decode_pixels)
    # Grad-CAM on threads of its own: one that outlives its 504 (a thread cannot be
    # stopped) then holds one of these, not one of the pool that decodes /predict's images.
    explainers = ThreadPoolExecutor(limits.explain_threads, thread_name_prefix="wingspan-explain")
    manifest = predictor.manifest
    # The run's name, not its path: the schema is for anyone who reaches the server.
    named = run_dir_of(Path(predictor.bundle)) or Path(predictor.bundle)
    app = FastAPI(title="wingspan", description=f"Predictions of the model '{named.name}'")
    most = limits.max_files * (limits.max_bytes + 4096)  # every file, with its part headers
    drain = (limits.drain_bytes, limits.drain_s)
    app.add_middleware(BodyLimit, most=most,
                       allowed=f"at most {most} ({counted(limits.max_files, 'file')} of "
                               f"{limits.max_bytes} bytes, each with 4096 bytes of form "
                               "headers).", idle=limits.upload_idle_s,
                       rate=limits.min_upload_rate, drain=drain)
    app.add_middleware(Admission, in_flight=in_flight, most=limits.max_in_flight,
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

    page = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")

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
        counted in flight, or refused, as it arrived: `Admission`.)"""
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
        pixels = min(await asyncio.to_thread(header_pixels, upload.file), max_pixels())
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
    # The class at the finest level the image passes the unknown threshold at, else
    # "unknown"; the class the model names (a taxonomy's branch ends in it) whatever the
    # answer: predict's names, in predict's order.
    branch, level, said = answer_for(predictor, probs, predictor.known_level(scores))
    predicted, probability = (branch[-1][1:] if branch
                              else (predictor.classes[order[0]], float(probs[order[0]])))
    answer = {"file": name, "answer": said, "predicted": predicted,
              "probability": probability, "top": levels}
    if branch:
        answer["branch"] = [{"level": lv, "class": c, "probability": p} for lv, c, p in branch]
    answer["known_level"] = level
    answer.update(deciding_score(predictor, scores))
    return answer
