"""How `--help` lays out a panel of options: three columns (the option's names, the type
of its value, its help), the help taking all the width the other two leave.

Typer's own table gave --train-bn and --no-train-bn a column each, a `<bool>` type to every
flag and the number range beside the type; at 80 columns rich then shrank all of them alike,
and train's help ran down a column of 17 characters. Installed when help is first shown (rich's
help module is 0.1 s to import: not for every command)."""

from __future__ import annotations

import typer.core

try:  # (typer 0.2x parses with its own copy of click)
    from typer._click.exceptions import NoSuchOption
except ImportError:
    from click.exceptions import NoSuchOption


def install() -> None:
    """In typer's place, where typer has what it takes (0.2x; an older one lays out its own)."""
    from typer import rich_utils

    # typer's private names this layout uses: another typer that lacks one keeps its own.
    if all(hasattr(typer.core.TyperArgument, name) for name in
           ("display_name_raw", "display_type_rich", "_get_number_range_help_str")) and all(
            hasattr(rich_utils, name) for name in (
                "_print_options_panel", "_get_parameter_help", "highlighter",
                "negative_highlighter", "types_highlighter", "STYLE_OPTIONS_TABLE_PADDING",
                "STYLE_TYPES", "STYLE_OPTION_DEFAULT", "REQUIRED_SHORT_STRING",
                "STYLE_REQUIRED_SHORT", "STYLE_OPTIONS_PANEL_BORDER",
                "ALIGN_OPTIONS_PANEL")):
        rich_utils._print_options_panel = _options_panel


class Command(typer.core.TyperCommand):
    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as e:
            e.possibilities = near_options(e.option_name, e.possibilities, self.params)
            if setting := file_setting(e.option_name, self.params):
                e.message = (f"No such option: {e.option_name}. '{setting}' is a setting of "
                             f"a --config file: a line `{setting}: VALUE` in a YAML file "
                             "given with --config FILE.")
                e.possibilities = []
            raise

    def format_help(self, ctx, formatter) -> None:
        install()
        params = self.params  # the panels in one order in every command (typer: as met)
        self.params = sorted(params, key=_panel_rank)
        try:
            super().format_help(ctx, formatter)
        finally:
            self.params = params


class Group(typer.core.TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        install()
        super().format_help(ctx, formatter)


def file_setting(typed: str, params) -> str | None:
    """The training setting a misspelt option names where it has no option of its own, only
    a place in a --config file (a typed `optimizer` or `weight-decay` option: timm's users
    type them)."""
    if not any(p.name == "config" for p in params):
        return None
    from wingspan.config import TrainConfig

    name = typed.lstrip("-").replace("-", "_")
    taken = {p.name for p in params}
    return name if name in TrainConfig.__dataclass_fields__ and name not in taken else None


def near_options(typed: str, close, params) -> list[str]:
    """The options to suggest for a misspelt one: click's close matches, and every option
    that begins with what was typed (a typed `epoch` option suggested --epochs-head alone, its
    --epochs-finetune too far by difflib's measure to be named)."""
    close = list(close or [])
    if typed.startswith("--") and len(typed) >= 5:  # (not "--e": most of train's options)
        close += [o for p in params for o in (*p.opts, *p.secondary_opts)
                  if o.startswith(typed) and o not in close]
    return close


def _panel_rank(param) -> int:
    from wingspan.cli.options import Panel

    order = [v for k, v in vars(Panel).items() if not k.startswith("_")]
    panel = getattr(param, "rich_help_panel", None)
    return order.index(panel) if panel in order else -1


def _names_and_type(param, ctx):
    """The first two cells of a row: the option's names (--quiet, -q), its negative on a line
    below (--no-strict); the type of its value (its range goes with the help), none for a
    flag."""
    from typer import rich_utils as ru
    from typer.core import TyperArgument

    if isinstance(param, TyperArgument):
        names = ru.highlighter(param.display_name_raw
                               + ("..." if param.metavar is None and param.nargs != 1 else ""))
    else:
        names = ru.highlighter(", ".join(sorted(param.opts, key=lambda o: not o.startswith("--"))))
        if param.secondary_opts:
            names.append("\n")
            names.append_text(ru.negative_highlighter(", ".join(param.secondary_opts)))
    flag = getattr(param, "is_flag", False) and not getattr(param, "count", False)
    kind = "" if flag else (param.display_type_rich(ctx=ctx) or "").replace(" range>", ">")
    return names, kind


def _options_panel(*, name: str, params: list, ctx, markup_mode, console) -> None:
    """typer.rich_utils._print_options_panel's place (same arguments). The columns are as
    wide in every panel of the command."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text
    from typer import rich_utils as ru

    if not params:
        return
    every = [p for p in ctx.command.get_params(ctx) if not getattr(p, "hidden", False)]
    names_width, type_width = (max(len(line) for p in every
                                   for line in str(_names_and_type(p, ctx)[i]).split("\n"))
                               for i in (0, 1))
    required = any(p.required for p in every)
    table = Table(highlight=True, show_header=False, expand=True, box=None, pad_edge=False,
                  padding=ru.STYLE_OPTIONS_TABLE_PADDING)
    if required:
        table.add_column(no_wrap=True, min_width=1)  # "*"
    table.add_column(no_wrap=True, min_width=names_width)
    table.add_column(no_wrap=True, min_width=type_width)
    table.add_column(ratio=1)  # the help, in the width left
    for param in params:
        names, kind = _names_and_type(param, ctx)
        helped = ru._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode)
        if span := param._get_number_range_help_str():  # after [default: ...]
            helped.renderables.append(Text(f"[{span}]", style=ru.STYLE_OPTION_DEFAULT))
        cells = [names, ru.types_highlighter(Text(kind, style=ru.STYLE_TYPES)), helped]
        if required:
            cells.insert(0, Text(ru.REQUIRED_SHORT_STRING if param.required else "",
                                 style=ru.STYLE_REQUIRED_SHORT))
        table.add_row(*cells)
    console.print(Panel(table, border_style=ru.STYLE_OPTIONS_PANEL_BORDER, title=name,
                        title_align=ru.ALIGN_OPTIONS_PANEL))
