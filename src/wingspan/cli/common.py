"""What the commands share: the consoles they print on, and small helpers (markup-free
text, paths as shown, configs whose errors name the options typed, the data read)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wingspan import files
from wingspan.config import ReadConfig, SettingError
from wingspan.errors import WingspanError, counted
from wingspan.files import check_writable, stdout_gone


class _Results(Console):
    """stdout's console. Its reader gone (`| head`), the rest is not printed and the
    command goes on: rich's own way exited 1, as a crash does, though the files were
    written, and a `set -o pipefail` script stopped; `head` closing early is no failure."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        stdout_gone()


# Results on stdout; progress bars and errors on stderr. soft_wrap: a long line is left for
# the terminal to wrap, so a path printed in it copies whole (rich would break it in two).
out = _Results(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def plain(text) -> str:
    """A path, class name or message as it is: `IMG [male].jpg` is not Rich markup."""
    return escape(str(text))


def skipped(path, reason: str) -> str:
    """An image left out, and why, as a line: the reader's message names the path again
    ("skipped a.jpg: Cannot read image a.jpg: ..."), said once here."""
    why = str(reason).removeprefix(f"Cannot read image {path}: ")
    return f"[yellow]skipped[/] {plain(path)}: {plain(why)}"


def here(path, root: Path | None = None) -> Path:
    """A resolved path shown as other commands show theirs: relative to the working folder
    (or `root`: a table's images under the data's folder, named in its caption) when it
    lies inside it (runs/NAME), else as it is."""
    path = Path(path)
    try:
        base = root or Path.cwd()
    except FileNotFoundError:  # the working folder was deleted
        return path
    if base == Path(base.anchor):  # from /, tmp/runs/x read as relative to a folder
        return path
    try:
        return path.relative_to(base)
    except ValueError:
        return path


@contextlib.contextmanager
def run_first(name: str, model, others):
    """Around the work of `name` (predict, explain, evaluate), whose first argument is RUN:
    an error it raises while RUN is no model but an argument after it is one says that the
    two were swapped, with the command in order (the error alone named a photo folder as no
    model, or found no image in the run's folder). Checked on failure alone, so that other
    errors keep their order."""
    try:
        yield
    except WingspanError:
        from wingspan.errors import command
        from wingspan.training.folder import find_bundle

        def is_model(path) -> bool:
            try:
                bundle = find_bundle(path)
                # Only what could be one is read (its reader loads torch, 3-4 s: a typo in
                # `wingspan predict runs/typo photo.jpg` waited for it): a folder with a
                # manifest, or a safetensors file (a header length, then its JSON's "{").
                if bundle.is_dir() and not (bundle / "manifest.json").is_file():
                    return False
                if bundle.is_file():
                    with bundle.open("rb") as f:
                        if f.read(9)[8:] != b"{":
                            return False
                from wingspan.models.bundle import read_manifest

                read_manifest(bundle)
            except (WingspanError, OSError):
                return False
            return True

        others = list(others or [])
        other = next((o for o in others[:20] if is_model(o)), None)  # (a glob: thousands)
        if other is None or is_model(model):
            raise
        rest = [o for o in others if o is not other]
        rest = rest[:3] + (["..."] if len(rest) > 3 else [])
        raise WingspanError(f"{model} is not a model, and {other} is one: the two look "
                            "swapped.", hint="The run comes first: `"
                            + command(name, other, model, *rest) + "`.") from None


@contextlib.contextmanager
def stopped_said(kept):
    """Around a command's work: a Ctrl-C (or SIGTERM) says in a line what is left, `kept()`,
    as train and `data audit` say theirs (typer ended the others with 130 and not a word:
    was the output half written, or the earlier one lost?)."""
    try:
        yield
    except KeyboardInterrupt:
        err.print(f"Stopped: {kept()}", highlight=False)
        raise


def find_model(name: str, model, others=()) -> None:
    """RUN of `name` looked for before torch, torchvision and timm load (3-4 s): a mistyped
    run (`wingspan predict runs/typo photo.jpg`) is said at once (arguments swapped, a
    photo folder first, are said so by run_first, once a bundle has been read)."""
    from wingspan.training.folder import find_bundle

    with run_first(name, model, others):
        find_bundle(model)


def make_config(ctx: typer.Context, make, *args, renamed: dict[str, str] | None = None,
                **values):
    """`make(*args, **values)`: a config, whose errors name the options typed on the command
    line (--val-fraction) rather than the settings they set (val_fraction); a setting from
    a config file keeps its name. An option is found by its parameter's name, which is the
    setting's, or as `renamed` gives it ({setting: parameter}: serve's --timeout sets
    timeout_s, which its error named)."""
    try:
        return make(*args, **values)
    except SettingError as e:
        named = {p.name: next((o for o in p.opts if o.startswith("--")), p.opts[0])
                 for p in ctx.command.params  # (the first long name: --val, not its alias)
                 if p.param_type_name == "option"}
        named |= {setting: named[name] for setting, name in (renamed or {}).items()
                  if name in named}
        typed = {setting: option for setting, option in named.items()
                 if ctx.get_parameter_source((renamed or {}).get(setting, setting)).name
                 == "COMMANDLINE"}
        raise WingspanError(e.worded(typed, named), hint=e.hint) from None


def strict_exit(failed: int) -> None:
    """--strict of predict, explain and evaluate: the work done for the rest, exit 2 where
    an image was missing or unreadable (a script or CI job then fails on it)."""
    if failed:
        raise WingspanError(f"--strict: {counted(failed, 'image was', 'images were')} missing "
                            "or unreadable (listed above).",
                            hint="Mend or remove them, or leave --strict out to skip them.")


def _either(words) -> str:
    """".csv, .json or .html"."""
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def check_output_file(path: Path, suffixes: tuple[str, ...]) -> None:
    """Before any work: a file of a known kind, where one can be written (the results of a
    long prediction are not to be lost to a typo in --output)."""
    if path.is_dir():
        raise WingspanError(f"--output {path} is a folder.", hint="Name a file in it.")
    if path.suffix.lower() not in suffixes:
        stem = path.stem if path.stem not in ("-", "") and not path.name.startswith(".") \
            else "out"  # ('-' is no stdout here; '.csv' alone names no file: e.g. out.csv)
        raise WingspanError(f"--output {path}: the file must end in {_either(suffixes)}.",
                            hint=f"e.g. --output {path.with_name(stem + suffixes[0])}")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if existing != path.absolute() and not existing.is_dir():
        raise WingspanError(f"--output {path}: {existing} is a file, not a folder.")
    check_writable(existing if existing.is_dir() else existing.parent,
                   f"--output {path} goes there", hint="Write somewhere you have write access.")
    if files.WINDOWS and path.is_file():  # (Excel holds a CSV it shows: found at the end)
        try:
            open(path, "r+b").close()  # noqa: SIM115 - opened to be refused, if at all
        except PermissionError as e:
            raise WingspanError(f"--output {path}: another program may have it open, or it "
                                "is read-only.",
                                hint="Close it there (a spreadsheet, say), or name another "
                                     "file.") from e


def read_data(data: Path, format: str | None, group_regex: str | None, strict: bool,
              check_files: bool = True, report: bool = False):
    """DATA read; with `report`, what reading left out or flagged said first, as train says
    it (inspect lists every case itself)."""
    from wingspan.data import read_dataset
    from wingspan.data.samples import report_reading

    dataset = read_dataset(data, ReadConfig(format=format, group_regex=group_regex,
                                            strict=strict, check_files=check_files))
    if report:
        report_reading(dataset, lambda line: err.print(f"[yellow]{escape(line)}[/]",
                                                       highlight=False))
    return dataset


def pixel_budget(text: str) -> int | None:
    from wingspan.data.images import pixel_budget  # (Pillow: not for --help)

    return pixel_budget(text)


class _FoldedTable(Table):
    """A Table whose every column, those add_row makes too, folds (see folded_table)."""

    def __rich_console__(self, console, options):
        for column in self.columns:
            column.overflow = "fold"
        return super().__rich_console__(console, options)


def folded_table(*headers, **options) -> Table:
    """A rich Table whose every column folds a long value (a path, a class or timm name, a
    number) onto more lines in a narrow terminal or a pipe (80 columns), never cutting it
    with "…": at 60 columns `doctor` read "torch-fp…" for both torch-fp32 and torch-fp16
    (the one picked among them), `models list` "efficient…" for Lite0 and Lite2, `data
    audit` "azure_spo…" for a label; and "…" is no character of an ASCII terminal."""
    return _FoldedTable(*headers, **options)


def is_main_process() -> bool:
    """False in the ranks above 0 of a distributed run: they print nothing."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def same_on_every_rank():
    """Errors in the options themselves: under torchrun every process finds the same one
    before training starts, and rank 0 alone says it (not once per process)."""
    try:
        yield
    except WingspanError as e:
        e.every_rank = True
        raise
