"""A load check of `wingspan serve`, on loopback only, bounded in requests and time.

    python bench/serve_load.py RUN [--photos DIR] [--clients 1 8] [--seconds 60]
    python bench/serve_load.py RUN --page docs/serve-page.png   # + the page in Chromium
    python bench/serve_load.py RUN --clients 8 8 8 8            # memory over 4 minutes
    python bench/serve_load.py --smoke                          # a tiny demo model, seconds

The server is `python -m wingspan serve RUN` in its own process (so its RSS is its own).
For each client count, that many clients each send one real photo at a time for the given
seconds; the check reports throughput, p50/p99 latency, errors and the server's RSS before
and after. Beside it, `wingspan predict`'s images/s on the same photos and model, in this
process, is the yardstick for throughput. With --page, headless Chromium opens the page,
chooses photos one after another and times each to its answer; the last screenshot is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from wingspan.config import DemoConfig, TrainConfig, shared_data_dir
from wingspan.inference import Predictor
from wingspan.predict import expand_paths, predict

MAX_REQUESTS = 20_000  # per client count: the bound whatever --seconds says


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "wingspan", "serve", str(run),
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # choosing the engine measures it first
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer within 300 s")


async def load(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float) -> dict:
    latencies, errors, stop = [], [], time.perf_counter() + seconds
    # Each photo's multipart body is encoded once: the clients share this machine's cores
    # with the server, and should cost it as little as they can.
    bodies = []
    for name, data in photos:
        request = httpx.Request("POST", f"{url}/predict",
                                files=[("files", (name, data, "image/jpeg"))])
        bodies.append((request.read(), {"content-type": request.headers["content-type"]}))

    async def client(c: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.perf_counter() < stop and len(latencies) + len(errors) < MAX_REQUESTS:
            body, headers = bodies[i % len(bodies)]
            start = time.perf_counter()
            try:
                r = await c.post(f"{url}/predict", content=body, headers=headers)
                (latencies if r.status_code == 200 else errors).append(
                    time.perf_counter() - start)
            except httpx.HTTPError:
                errors.append(time.perf_counter() - start)
            i += clients

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*[client(c, k) for k in range(clients)])
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"clients": clients, "requests": len(latencies), "errors": len(errors),
            "images_per_s": len(latencies) / took, "p50_ms": 1000 * q[49],
            "p99_ms": 1000 * q[98],
            # The clients' own share of the machine's cores, which the server did not get.
            "client_cpu_share": cpu / took / (os.cpu_count() or 1)}


def page_check(url: str, paths: list[str], screenshot: Path, n: int = 10) -> dict:
    """Seconds from choosing a photo on the page to its answer drawn, n photos in turn."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("WINGSPAN_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        raise SystemExit("--page needs chromium: apt-get install -y chromium")
    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.goto(url)
        for path in paths[:n]:
            start = time.perf_counter()
            page.set_input_files("#file", path)
            name = json.dumps(Path(path).name)
            page.wait_for_function(
                f"document.getElementById('photo-name').textContent == {name}"
                " && ['predicted', 'explained'].includes(document.body.dataset.state)")
            times.append(time.perf_counter() - start)
            page.wait_for_selector("body[data-state=explained]")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    return {"page_answer_median_s": statistics.median(times), "page_answer_max_s": max(times)}


def smoke_run(work: Path) -> tuple[Path, Path]:
    from wingspan.data import read_dataset
    from wingspan.data.demo import generate_demo
    from wingspan.training import train

    data = generate_demo(work / "demo", DemoConfig(image_size=64, images_per_class=(8,) * 4))
    # timm's test network: with weights "none", backbone auto would be ResNet-50, whose
    # training, engine timing (an ONNX export) and serving took most of the smoke's time.
    config = TrainConfig(backbone="test_efficientnet", weights="none", image_size=32,
                         epochs_head=1, epochs_finetune=0, feature_views=1,
                         val_fraction=0.25, test_fraction=0.0)
    return train(read_dataset(data), config, work / "runs", "smoke", quiet=True), data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, help="a run folder or bundle")
    parser.add_argument("--photos", type=Path, help="default: the shared iNat photos")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--page", type=Path, help="also time the page; screenshot here")
    parser.add_argument("--smoke", action="store_true", help="tiny demo model, 2 s per load")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="wingspan-serve-load-"))
    if args.smoke:
        args.run, args.photos = smoke_run(work)
        args.seconds = min(args.seconds, 2)
    if args.run is None:
        parser.error("give a RUN (or --smoke)")
    photos_dir = args.photos or shared_data_dir() / "inat-butterflies"
    paths, missing = expand_paths([str(photos_dir)])
    paths = paths[:200]
    if not paths:  # (else a server started, then a division by zero)
        parser.error(f"no photos at {photos_dir}"
                     + (f": {missing[0][1]}" if missing else "") + "; give --photos DIR")
    photos = [(Path(p).name, Path(p).read_bytes()) for p in paths]

    predictor = Predictor(args.run)  # as `wingspan predict` makes it: its batch, its workers
    predict(predictor, paths, progress=False)  # warm
    baseline = predict(predictor, paths, progress=False).images_per_second
    del predictor

    server, url = start_server(args.run)
    try:
        asyncio.run(load(url, photos, max(args.clients), min(5.0, args.seconds)))  # warm
        rss_before = rss_mb(server.pid)
        rows = []
        for n in args.clients:  # the RSS after each load: a leak climbs, warm-up levels off
            rows.append({**asyncio.run(load(url, photos, n, args.seconds)),
                         "rss_mb_after": rss_mb(server.pid)})
        rss_after = rows[-1]["rss_mb_after"]
        page = page_check(url, paths[::7], args.page) if args.page else {}
    finally:
        server.terminate()
        server.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)

    print(f"wingspan predict on {len(paths)} photos: {baseline:.1f} images/s")
    for r in rows:
        print(f"{r['clients']:>2} clients: {r['images_per_s']:.1f} images/s "
              f"({r['images_per_s'] / baseline:.0%} of predict), p50 {r['p50_ms']:.0f} ms, "
              f"p99 {r['p99_ms']:.0f} ms (p99/p50 {r['p99_ms'] / r['p50_ms']:.2f}), "
              f"{r['requests']} requests, {r['errors']} errors; the clients took "
              f"{r['client_cpu_share']:.0%} of the CPU; server RSS then "
              f"{r['rss_mb_after']:.0f} MB")
    growth = rss_after / rss_before - 1
    print(f"server RSS {rss_before:.0f} MB before, {rss_after:.0f} MB after ({growth:+.1%})")
    if page:
        print(f"page: answer {page['page_answer_median_s']:.2f} s median, "
              f"{page['page_answer_max_s']:.2f} s worst; screenshot {args.page}")
    if args.out:
        args.out.write_text(json.dumps({"predict_images_per_s": baseline, "load": rows,
                                        "rss_mb": [rss_before, rss_after], **page}, indent=1))
    if any(r["errors"] for r in rows):
        raise SystemExit("errors under load")


if __name__ == "__main__":
    main()
