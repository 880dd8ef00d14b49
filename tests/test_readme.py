"""The README's commands and the CLI agree, and so do the CLI's own words: an option that is
renamed or dropped, or a choice added, shows here rather than in a user's failed command."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer.main

from wingspan.cli import app

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
# The README and the pages it links to (docs/performance.md: the measurements' commands).
PAGES = [README] + [page.read_text() for page in sorted((ROOT / "docs").glob("*.md"))]
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# `--opt a|b|c`: the values an option takes, as the README lists them
CHOICES = re.compile(r"(--[a-z][a-z0-9-]*) ([a-z0-9+-]+(?:\|[a-z0-9+-]+)+)(?=[\]\s`]|$)")


def _commands(command=None, path=()):
    """Every command (`data split`, `train`...) by its words, with its click object."""
    command = command or typer.main.get_command(app)
    if not hasattr(command, "commands"):
        yield path, command
        return
    for name, sub in command.commands.items():
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands())


def _options(command) -> dict[str, object]:
    return {o: p for p in command.params for o in (*p.opts, *p.secondary_opts)}


def _command_lines() -> list[str]:
    """The `wingspan ...` commands of the README and docs/: inline code and shell lines
    (continuations joined), wherever they are (Usage, GPUs, Performance)."""
    found = []
    for page in PAGES:
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", page, flags=re.S)
        found += [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
        found += re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", page, flags=re.S))
    return [" ".join(s.split()) for s in found if re.search(r"(^|\s)wingspan [a-z]", s)]


def _resolve(line: str):
    """The command a README line runs, and the words after it."""
    words = line[line.index("wingspan ") + len("wingspan "):].split()
    for n in range(len(words), 0, -1):
        if tuple(words[:n]) in COMMANDS:
            return tuple(words[:n]), words[n:]
    return None, words


def _help_choices(text: str) -> set[str]:
    """The values a help text lists as `a (what it does) | b | c.`"""
    parts = re.sub(r"\([^()]*\)", "", text).split(" | ")
    if len(parts) < 2:
        return set()
    first = parts[0].split()[-1]
    return {first, *(p.split()[0].rstrip(".,;") for p in parts[1:])}


def test_the_readme_runs_real_commands_with_real_options():
    lines = _command_lines()
    assert len(lines) > 30  # the parsing found the README's commands
    wrong = []
    for line in lines:
        path, rest = _resolve(line)
        if path is None:
            if not line.startswith("|"):  # a table's header ("wingspan s") runs nothing
                wrong.append(f"no such command: `{line}`")
            continue
        options = _options(COMMANDS[path])
        wrong += [f"wingspan {' '.join(path)} has no {o} (README: `{line}`)"
                  for o in OPTION.findall(" ".join(rest)) if o not in options]
    assert not wrong, "\n".join(wrong)


def test_the_readme_lists_each_options_choices_as_its_help_does():
    """A synopsis (`### wingspan data preview DATA [--augment a|b|c]`) lists every value the
    option takes; elsewhere the README may name a few (`--precision fp32|bf16|fp16`), but
    only real ones."""
    wrong = []
    for line in _command_lines() + [o for page in PAGES
                                    for o in re.findall(r"`(--[a-z-]+ [a-z0-9+|-]+)`", page)]:
        path, rest = _resolve(line) if "wingspan " in line else (None, line.split())
        synopsis = f"### `{line}`" in README
        for option, listed in CHOICES.findall(" ".join(rest)):
            listed = set(listed.split("|"))
            # Without a command (`--format folder|csv|...`): the one that has such an option.
            commands = [path] if path else [p for p, c in COMMANDS.items()
                                            if option in _options(c)]
            takes = {p: _help_choices(_options(COMMANDS[p])[option].help or "")
                     for p in commands}
            if takes and not any(listed <= real and (real == listed or not synopsis)
                                 for real in takes.values()):
                wrong.append(f"`{line}`: {option} takes " + "; ".join(
                    f"{' | '.join(sorted(real))} (wingspan {' '.join(p)})"
                    for p, real in takes.items()))
    assert not wrong, "\n".join(wrong)


def test_every_option_a_message_or_help_names_exists():
    """Hints, errors and help texts that tell the user to type `--x`: --x is a real option
    (of some command: "predict --unknown-score" is named in train's help)."""
    real = {"--help"} | {o for c in COMMANDS.values() for o in _options(c)}
    real |= {o for p in typer.main.get_command(app).params for o in p.opts}  # --version
    real |= {"--shm-size"}  # (another program's, named with it: `docker run --shm-size 1g`)
    named = []
    for file in sorted((ROOT / "src" / "wingspan").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named += [(file.name, node.lineno, o) for o in OPTION.findall(node.value)]
    assert named  # the scan sees the messages
    assert [n for n in named if n[2] not in real] == []


@pytest.mark.parametrize("path", [p for p, c in COMMANDS.items() if "--device" in _options(c)],
                         ids=" ".join)
def test_every_device_option_says_it_takes_a_gpus_number(path):
    # They all resolve the device alike (cuda:1 picks the second GPU), so all say so.
    assert "cuda:N" in _options(COMMANDS[path])["--device"].help


def test_the_readmes_links_to_files_of_the_repository_lead_to_them():
    """A link or image of the README and of docs/ (`[the record](docs/performance.md)`)
    names a file that is there: a page moved or renamed shows here, not as a dead link."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    links = [(page, target) for page in pages
             for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text())
             if "://" not in target]
    assert len(links) >= 4  # the scan sees the README's links and images
    assert [f"{page.name}: {target}" for page, target in links
            if not (page.parent / target).exists()] == []


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation but - and _ dropped,
    each space a -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readmes_contents_lead_to_its_sections():
    """The contents at the top link each section by its anchor, which a heading's new
    option or wording changes: a link left pointing at nothing shows here."""
    headings, fenced = set(), False
    for line in README.splitlines():
        fenced ^= line.startswith("```")  # (a shell comment in a code block is no heading)
        if not fenced and (found := re.match(r"#{1,4} (.+)", line)):
            headings.add(_slug(found[1]))
    anchors = re.findall(r"\]\(#([^)]+)\)", README)
    assert len(anchors) >= 20  # the contents, found
    assert [a for a in anchors if a not in headings] == []


def test_every_environment_variable_wingspan_reads_is_in_the_readmes_table():
    """They were said in ten places and listed in none: a new one shows here."""
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "wingspan").rglob("*.py"))
    names = set(re.findall(r"\bWINGSPAN_[A-Z_]+\b", source)) - {"WINGSPAN_LAUNCHER_PID"}
    table = README.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    assert len(names) >= 7  # the scan sees them
    assert sorted(n for n in names if f"`{n}`" not in table) == []
