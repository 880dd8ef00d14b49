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

The parts: `app` (the endpoints, and what an answer holds), `limits` (what a request may
cost, bounded before the app reads it), `batching` (requests that arrive together answered
in one forward pass), `server` (uvicorn, in the foreground or a thread).
"""

from wingspan.config import ServeLimits
from wingspan.serve.app import create_app
from wingspan.serve.server import (
    check_port,
    limit_malloc_arenas,
    serve,
    serving_in_background,
)

__all__ = ["ServeLimits", "check_port", "create_app", "limit_malloc_arenas", "serve",
           "serving_in_background"]
