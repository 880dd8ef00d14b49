"""Small helpers for tests: writing images, and stopping a training run part-way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def bench_module(name: str):
    """A script of bench/ as a module (bench/ is no package), once per session."""
    import importlib.util
    import sys

    if name not in sys.modules:
        path = Path(__file__).parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # (its dataclasses look their module up)
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_image(path: Path, size=(32, 32), colour=(200, 50, 50), mode="RGB", fmt=None,
                seed: int | None = None, **save) -> Path:
    """Write an image; a seed gives random pixels so that files differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt, **save)
    return path


def ctrl_c_at_rename(monkeypatch, nth: int) -> None:
    """Ctrl-C as the nth os.replace of the code under test starts (files written to be
    renamed together: stopped between them)."""
    replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)


def folder_dataset(root: Path, counts: dict[str, int], size=(24, 24)) -> Path:
    """root/<class>/<i>.jpg with distinct random pixels in every file."""
    seed = 0
    for label, n in counts.items():
        for i in range(n):
            write_image(root / label / f"{label}_{i}.jpg", size=size, seed=seed)
            seed += 1
    return root


def broken_images(folder: Path, n: int) -> list[Path]:
    """n unreadable '.jpg' files in `folder`: empty, text, and JPEGs cut short, in turn."""
    good = write_image(folder / "whole.tmp.jpg", seed=99, fmt="JPEG").read_bytes()
    (folder / "whole.tmp.jpg").unlink()
    paths = [folder / f"broken_{i}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        path.write_bytes([b"", b"not an image\n", good[: len(good) // 3]][i % 3])
    return paths


# `python -m wingspan.cli` that stops short, asleep, once `epochs` fine-tuning epochs are in
# its history and it has written its next checkpoint after them (mid-epoch where one falls
# due each step): a test's signal then lands with epochs still to go. Unpaused, a tiny run
# finished its last 4 epochs between the test's poll and its signal on a loaded CI machine.
PAUSED_CLI = """
import sys, time
from wingspan.training.context import Run
epochs, save, saves = int(sys.argv.pop(1)), Run.save, []
def paused(run, *args, **kwargs):
    save(run, *args, **kwargs)
    if sum(row["stage"] == "finetune" for row in run.state.history) >= epochs:
        saves.append(1)
        if len(saves) == 2:
            time.sleep(300)  # the test's signal lands here
Run.save = paused
from wingspan.cli import main
main()
"""


def wait_for_finetune_epochs(proc, run_dir: Path, epochs: int, timeout: float = 300) -> None:
    """Poll a training subprocess until its history.csv has `epochs` fine-tuning rows (it
    must still be running then, to be killed mid-run). Past `timeout` (a loaded 2-core CI
    machine takes a minute) the test fails here, saying so, not later at a puzzling line."""
    import time

    import pandas as pd

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        h = run_dir / "history.csv"
        if h.is_file() and (pd.read_csv(h)["stage"] == "finetune").sum() >= epochs:
            return
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    proc.kill()
    pytest.fail(f"no {epochs} fine-tuning epochs in {run_dir / 'history.csv'} after {timeout} s")


def wait_until_serving(proc, port: int, timeout: float = 180) -> None:
    """Poll a `wingspan serve` subprocess until /health answers; fail, with its stderr, if
    it ends or `timeout` passes first (start-up takes seconds, a minute on a loaded box)."""
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    pytest.fail(f"the server did not answer /health within {timeout} s: "
                + proc.communicate()[1][-3000:])


def kill_at_first_finetune_row(monkeypatch) -> None:
    """Make training raise KeyboardInterrupt (a Ctrl-C) when the first fine-tuning epoch's
    history row is about to be written: after that epoch's best.pt, before its last.pt.
    Call monkeypatch.undo() once the killed run is done."""
    from wingspan.training.context import Run

    add_history = Run.add_history

    def killed(run, row):
        if row["stage"] == "finetune":
            raise KeyboardInterrupt
        add_history(run, row)

    monkeypatch.setattr(Run, "add_history", killed)


def kill_at(target: str, nth: int = 1, match: str = "") -> None:
    """SIGKILL this process (no cleanup, as `kill -9` or the OOM killer) on entering the
    nth call of `target`, "module:function" or "module:Class.method", whose str or Path
    arguments include `match`."""
    import importlib
    import os
    import signal

    module, name = target.split(":")
    owner = importlib.import_module(module)
    if "." in name:
        cls, name = name.split(".")
        owner = getattr(owner, cls)
    function, calls = getattr(owner, name), [0]

    def killed(*args, **kwargs):
        if any(match in str(a) for a in args if isinstance(a, str | Path)) or not match:
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    setattr(owner, name, killed)


def cli_killed_at(argv: list, target: str, nth: int = 1, match: str = ""):
    """Run `wingspan ARGV` in a new process, killed as kill_at says; its CompletedProcess.

    The process is forked from a server that imported wingspan once for the whole session
    (multiprocessing's forkserver, which itself never ran torch): a fresh `python` would
    spend most of each call importing torch and timm again. The server's environment and
    working folder are those of the test that started it: the caller's are passed on."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        child = _warm().Process(target=_main_killed_at,
                                args=([str(a) for a in argv], target, nth, match, out, err,
                                      dict(os.environ), os.getcwd()))
        child.start()
        child.join()
        return subprocess.CompletedProcess(argv, child.exitcode, out.read_text(),
                                           err.read_text())


def _warm():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["wingspan.cli", "wingspan.training.run", "helpers"])
    return context


def _main_killed_at(argv: list[str], target: str, nth: int, match: str, out: Path,
                    err: Path, environ: dict[str, str], cwd: str) -> None:
    """In the forked process: the caller's environment and folder, stdout and stderr to
    files, the kill set, then the CLI."""
    import os
    import sys

    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)

    for stream, path in ((sys.stdout, out), (sys.stderr, err)):
        with open(path, "w") as f:
            os.dup2(f.fileno(), stream.fileno())
    kill_at(target, nth, match)
    from wingspan.cli import main

    main(argv)


def chromium_path() -> str:
    """Debian's chromium (.ci/run installs it). Missing, the page test skips on a
    developer's machine, and fails where WINGSPAN_REQUIRE_BROWSER is set, as in CI."""
    found = os.environ.get("WINGSPAN_CHROMIUM") or next(
        filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
    if not found:
        message = "no chromium to drive: apt-get install -y chromium"
        if os.environ.get("WINGSPAN_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def axe_script() -> str:
    """axe-core's script, which `make test` installs with npm into .venv/axe. Missing, the
    accessibility checks skip on a developer's machine, and fail where
    WINGSPAN_REQUIRE_AXE is set (CI, wherever npm is)."""
    found = Path(os.environ.get("WINGSPAN_AXE") or Path(__file__).parents[1] / ".venv" / "axe"
                 / "node_modules" / "axe-core" / "axe.min.js")
    if not found.is_file():
        message = f"no axe-core at {found}: make test installs it (npm install axe-core)"
        if os.environ.get("WINGSPAN_REQUIRE_AXE"):
            pytest.fail(message)
        pytest.skip(message)
    return found.read_text(encoding="utf-8")


def accessibility_problems(page) -> list[str]:
    """What axe-core finds against WCAG 2.1 A and AA and its best practices on the page as
    it is now in Playwright's `page`: one line a rule, with its first offending element."""
    page.add_script_tag(content=axe_script())
    return page.evaluate("""async () => {
        const tags = ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'];
        const found = await axe.run(document, {runOnly: {type: 'tag', values: tags}});
        return found.violations.map(v => `${v.impact} ${v.id} (${v.nodes.length}): ` +
            `${v.help}: ${v.nodes[0].target.join(' ')}`);
    }""")


def cli_in_new_process(args: list, modules: tuple[str, ...], timeout: int = 120
                       ) -> subprocess.CompletedProcess:
    """`wingspan ARGS` in a fresh interpreter, whose stdout then says "exit CODE" and
    "imported: [...]", which of `modules` the command imported: what a command's path
    imports, not how long it takes (a test a loaded machine cannot fail)."""
    code = ("import sys\nfrom wingspan.cli.app import main\n"
            f"try:\n    main({[str(a) for a in args]!r})\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            f"print('imported:', sorted(m for m in {modules!r} if m in sys.modules))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)
