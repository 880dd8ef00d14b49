"""The `wingspan` app, its `data` and `models` groups, and `main`: the entry point that turns
a user's error into a message and a hint (exit code 2) instead of a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Annotated

import typer

from wingspan import __version__
from wingspan.cli import helppage
from wingspan.cli.common import err, out, pixel_budget, plain, stdout_gone
from wingspan.config import MAX_PIXELS_ENV
from wingspan.errors import (
    DROPPED,
    TERMINATED,
    WingspanError,
    die_with_launcher,
    end_started,
    forks_die_of_sigterm,
    out_of_memory_said,
    redeliver_dropped_sigterm,
    sigterm_handler,
)
from wingspan.files import os_error_said

app = typer.Typer(
    help="Train, evaluate and explain butterfly image classifiers by transfer learning.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    cls=helppage.Group,
)
data_app = typer.Typer(help="Read, check, split and preview datasets.", no_args_is_help=True,
                       cls=helppage.Group)
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="Backbones and their pretrained weights.", no_args_is_help=True,
                         cls=helppage.Group)
app.add_typer(models_app, name="models")


# The commands that share their work over the processes torchrun starts (--devices).
MULTI_PROCESS = {"train", "predict"}


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context,
          version: Annotated[bool, typer.Option("--version", help="Show the version.")] = False):
    if version:
        out.print(f"wingspan {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is not None:  # (every command: train and predict ignored it)
        _check_pixel_budget()
    if ctx.invoked_subcommand not in (None, "data", "models", *MULTI_PROCESS):
        _one_process(ctx.invoked_subcommand)


@data_app.callback()
def _data(ctx: typer.Context):
    _one_process(f"data {ctx.invoked_subcommand}")


def _one_process(command: str) -> None:
    """A command that runs in one process, refused where torchrun started several."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # (torch is loaded only under torchrun)
        from wingspan.parallel import check_one_process

        check_one_process(command)


def _check_pixel_budget() -> None:
    """$WINGSPAN_MAX_PIXELS refused when it is no number (the library takes the default
    then, without a word: 200M in a job script trained at 50 MP)."""
    budget = os.environ.get(MAX_PIXELS_ENV)
    if budget is not None and pixel_budget(budget) is None:
        raise WingspanError(f"${MAX_PIXELS_ENV} is {budget!r}, not a number of pixels.",
                            hint=f"Set it to a whole number, e.g. {MAX_PIXELS_ENV}=100000000 "
                                 "(100 MP), or unset it.", every_rank=True)


def readable_help(*apps: typer.Typer) -> None:
    """Each command's help as written paragraphs: its docstring's line breaks, which rich
    mode keeps (a line of "the" in an 80-column terminal), joined within each paragraph;
    `wingspan --help` lists it by the first paragraph. Its options laid out by helppage."""
    import inspect

    for each in apps:
        for info in each.registered_commands:
            if info.callback is not None:
                paragraphs = [" ".join(p.split()) for p in
                              (inspect.getdoc(info.callback) or "").split("\n\n")]
                info.help = info.help or "\n\n".join(paragraphs)
                info.short_help = info.short_help or paragraphs[0]
            info.cls = helppage.Command


def _rank() -> int:
    """This process's rank: the process group's, or before it exists the launcher's
    (torchrun sets RANK in every process it starts)."""
    dist = sys.modules.get("torch.distributed")  # (not imported: no group; 1.6 s to import)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _home_expanded(argv: list[str]) -> list[str]:
    """A quoted "~/runs" (or --out=~/runs), which the shell passes as it is, is the user's
    home as every other tool reads it: never a folder named "~" made in the current one
    (which a user may later clean up with `rm -rf ~`)."""
    expanded = []
    for arg in argv:
        option, eq, value = arg.partition("=")
        if arg.startswith("~"):
            arg = os.path.expanduser(arg)
        elif arg.startswith("--") and eq and value.startswith("~"):
            arg = f"{option}={os.path.expanduser(value)}"
        expanded.append(arg)
    return expanded


# Options whose empty value means something ("" holds no class out, over a config file's).
EMPTY_ALLOWED = ("--holdout-classes",)


def _refuse_empty(argv: list[str]) -> None:
    """An empty argument, most often an unset shell variable (`--out "$OUT"`), is refused:
    a path of "" is the current folder, where `data split` replaced a splits.csv and export
    wrote its graph, and `train ""` read every image below it; other options took "" as
    their default, or said "Unknown precision ''"."""
    for i, arg in enumerate(argv):
        option, eq, value = arg.partition("=")
        before = argv[i - 1] if i else ""
        if arg == "" and before not in EMPTY_ALLOWED:
            where = f"after {before}" if before.startswith("-") else f"as argument {i + 1}"
        elif arg.startswith("--") and eq and not value and option not in EMPTY_ALLOWED:
            where = f"to {option}"
        else:
            continue
        raise WingspanError(f"An empty value was given {where} (an unset shell variable?).",
                            hint="Give a value, or leave the option out for its default.")


def _sigterm_as_interrupt() -> None:
    """SIGTERM (`kill`'s, `timeout`'s, a scheduler's) stops any command as Ctrl-C does,
    so that what it was writing is removed by its `finally` blocks: by default the process
    ended on the spot, and left an export's temporary graph (16 MB for a Lite0), the graph
    cache's torn pieces, evaluate's half-written folder. `train` puts its own in place
    while it runs (which says how to go on). Not where a handler was set already."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    @sigterm_handler
    def stop(signum, frame):
        if TERMINATED.is_set() and not DROPPED.is_set():  # a second one: at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        DROPPED.clear()  # (the first, sent again where Python had dropped it: as the first)
        TERMINATED.set()
        end_started()
        raise KeyboardInterrupt("SIGTERM")

    shown = sys.unraisablehook

    def unraisable(what) -> None:
        # A process group's SIGTERM (`timeout`'s, a scheduler's) ends the data workers
        # too, before the loader that is being stopped shuts them down: its __del__ then
        # says so in a traceback ("DataLoader worker ... killed by signal: Terminated").
        if not (TERMINATED.is_set() and isinstance(what.exc_value, RuntimeError)
                and str(what.exc_value).startswith("DataLoader worker")):
            shown(what)

    sys.unraisablehook = unraisable
    redeliver_dropped_sigterm()
    forks_die_of_sigterm()  # (a Pool's worker, which Pool.terminate ends so)
    signal.signal(signal.SIGTERM, stop)


def _stdout_is_devnull() -> bool:
    with contextlib.suppress(OSError, ValueError, AttributeError):  # (no file: captured)
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    return False


@contextlib.contextmanager
def _plain_warnings():
    """wingspan's own warnings as the command's other lines ("Warning: ..."), not Python's
    "policy.py:171: UserWarning: ..." and the source line below it (a cache that cannot be
    written). Other packages' keep Python's form, which says where to report them. For the
    command's time: main() called in-process (tests, a script) leaves the hook as it was."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(
                package + os.sep):
            err.print(f"[yellow]Warning:[/] {plain(str(message))}", highlight=False)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _batch_size(args: list[str]) -> int | None:
    """The batch size of a command that has --batch-size (its value, else its default), for
    an out-of-memory message; None for a command without it, or where a file sets it. The
    command's own options say whether it has one, so that no command is left out."""
    command, words = typer.main.get_command(app), list(args)
    while hasattr(command, "commands") and words:  # a group: `data audit`, `models list`
        command = command.commands.get(words.pop(0))
    option = next((p for p in getattr(command, "params", ()) if p.name == "batch_size"), None)
    if option is None:
        return None
    for i, arg in enumerate(args):
        value = (args[i + 1] if arg == "--batch-size" and i + 1 < len(args)
                 else arg.partition("=")[2] if arg.startswith("--batch-size=") else None)
        if value is not None and value.isdigit():
            return int(value)
    if args[0] == "train" and any(a in ("--config", "--resume") or a.startswith("--config=")
                                  for a in args):
        return None  # (the file's or the run's own: not read here)
    return option.default


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; user errors print as a message and a hint, exit code 2."""
    die_with_launcher()  # (first: a rank that outlives the launcher in its start-up lingers)
    _sigterm_as_interrupt()
    # A terminal or pipe in ASCII, Latin-1 or cp1252 cannot show every class name, nor the
    # "…" rich cuts a cell with: escaped there (as stderr does), not a traceback once the
    # work is done.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")
    quiet_before = _stdout_is_devnull()
    args = _home_expanded(sys.argv[1:] if argv is None else list(argv))
    try:
        try:
            _refuse_empty(args)
            with _plain_warnings():
                app(args=args, prog_name="wingspan")
        except SystemExit as e:  # (Ctrl-C's is 130; a SIGTERM'd process's, 143: serve's
            # too, which shuts down in order and ends as if done)
            if e.code in (0, None, 130) and TERMINATED.is_set():
                raise SystemExit(143) from None
            if e.code == 1 and "--help" in args and not quiet_before and _stdout_is_devnull():
                # rich's exit where the reader of typer's help went (`wingspan --help |
                # head`; it points stdout at /dev/null first): no failure, as where the
                # reader of a command's results goes. (A command cut short so, its stderr's
                # reader gone mid-run, stays a failure: its work was not done.)
                raise SystemExit(0) from None
            raise
        finally:
            try:  # what is still buffered, while a pipe's reader may be gone (`| head`)
                sys.stdout.flush()
            except BrokenPipeError:
                stdout_gone()
    except (WingspanError, OSError, RuntimeError, MemoryError) as e:  # an OSError: a read-only
        # or full disk, a permission; a RuntimeError: torch's out of memory
        said = (e if isinstance(e, WingspanError) else os_error_said(e)
                if isinstance(e, OSError) else out_of_memory_said(e, _batch_size(args),
                                                           training=args[:1] == ["train"]))
        if said is None:  # another OSError: a bug to report, with its traceback
            raise
        if said.every_rank and _rank() != 0:  # rank 0 says it once for all
            sys.exit(2)
        err.print(f"[bold red]Error:[/] {plain(said.message)}", highlight=False)
        if said.hint:
            err.print(f"[cyan]Hint:[/] {plain(said.hint)}", highlight=False)
        sys.exit(2)
