"""Serving an app with uvicorn: in the foreground (`wingspan serve`), or from a thread
of this process (tests, benchmarks, notebooks)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from wingspan.config import SERVE_HOST, SERVE_PORT, ServeLimits
from wingspan.errors import WingspanError, first_line
from wingspan.serve.app import create_app


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


def serve(model: str | Path, host: str = SERVE_HOST, port: int = SERVE_PORT,
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
