"""The `wingspan` console script and `python -m wingspan`: the CLI, run inside Ctrl-C's
handling.

Importing the commands (typer, rich and their modules) and typer's building of them take
0.2-0.5 s, more on a loaded machine, and a Ctrl-C then (a command typed wrong and stopped
at once) printed a 20-line KeyboardInterrupt traceback from deep in an import. Once a
command runs, a Ctrl-C stops it quietly with 130 (143 for a SIGTERM, which wingspan's
handler turns into one); so it does here. (This module imports nothing, so that the window
left is the interpreter's own start-up.)
"""

import sys


def main() -> None:
    try:
        from wingspan.cli import main as cli

        cli()
    except KeyboardInterrupt:
        errors = sys.modules.get("wingspan.errors")
        raise SystemExit(143 if errors and errors.TERMINATED.is_set() else 130) from None
    finally:
        # A KeyboardInterrupt that left code run by exec() of a string (namedtuple,
        # dataclasses and typing build classes so, all through torch's imports) sets
        # CPython's "unhandled KeyboardInterrupt" flag, caught or not: under `python -m`
        # (how torchrun and Fabric's launcher start each process) the process then killed
        # itself with SIGINT, 130 for SIGTERM's 143. The next exec() of a string clears it.
        exec("")
