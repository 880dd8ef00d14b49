"""Shared fixtures: generated datasets, the real photo sets when present, a CLI runner."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from wingspan.cli import main
from wingspan.config import DemoConfig, shared_data_dir
from wingspan.data.demo import generate_demo
from wingspan.models.runtime import forget_sessions

# Tests never need a display or more threads than the machine has.
os.environ.setdefault("MPLBACKEND", "Agg")
# A cache of their own (decoded images, measured engines), shared by the whole session and
# the processes it starts: never the user's ~/.cache, and one engine choice per model.
os.environ["WINGSPAN_CACHE"] = tempfile.mkdtemp(prefix="wingspan-test-cache-")
# The suite's engine timings share the cores with its other workers: a choice so timed is
# not kept (EngineConfig.max_core_wait), and what a test finds in the engine cache would
# hang on the load of the moment (a module's run timed one engine, a test's predict then
# another, and their figures differed in the last digits). Every choice is kept here, in
# subprocesses too; the tests of that rule unset it.
os.environ["WINGSPAN_MAX_CORE_WAIT"] = "1"
atexit.register(shutil.rmtree, os.environ["WINGSPAN_CACHE"], ignore_errors=True)
# make test runs the suite in pytest-xdist workers, one per core: each takes its share of the
# cores, so that two workers do not both spin two threads on two cores. The processes a test
# starts (the CLI, DDP ranks, the tutorial's kernel, the bench scripts) take the same share
# through OMP_NUM_THREADS, which torch reads at start (ONNX Runtime follows torch's count).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _THREADS = max(1, (cores or 1) // _WORKERS)  # (macOS has no affinity call)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


@pytest.fixture(autouse=True)
def _no_onnx_session_kept():
    """Each test exports its own ONNX graphs: one kept from an earlier test would hide an
    export that a test counts or breaks on purpose."""
    forget_sessions()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not present at {path} (set WINGSPAN_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small synthetic folder-per-class dataset with taxonomy.csv (4 imbalanced classes)."""
    return generate_demo(tmp_path_factory.mktemp("demo"),
                         DemoConfig(image_size=48, images_per_class=(16, 12, 9, 6)))


@pytest.fixture
def run_cli(capsys):
    """Run `wingspan ARGS...` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str | Path) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
