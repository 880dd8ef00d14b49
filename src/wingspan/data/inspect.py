"""`wingspan data inspect`: what is in a dataset, and what is wrong with it."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from wingspan.config import InspectConfig, TrainConfig
from wingspan.data.images import UNUSUAL_MODES, ImageFacts, image_facts, max_pixels
from wingspan.data.leaks import find_leaks
from wingspan.data.plots import plot_class_balance
from wingspan.data.samples import BIASING_PROBLEMS, GROUP, PATH, SPLIT, Dataset
from wingspan.data.taxonomy import taxonomy_conflicts
from wingspan.errors import counted
from wingspan.files import name_part, write_text
from wingspan.progress import track

EXAMPLES = 5  # how many paths the printed summary names per finding (the JSON has all)


def inspect_dataset(
    dataset: Dataset, out_dir: Path, config: InspectConfig | None = None,
    check_images: bool = True, progress: bool = True,
) -> dict:
    """Count, check every image, write `summary.json` and a balance plot per level."""
    config = config or InspectConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    table = dataset.table
    summary: dict = {
        "dataset": {"name": dataset.name, "root": str(dataset.root), "format": dataset.format,
                    "images": len(table), "levels": dataset.levels,
                    "splits": table[SPLIT].replace("", "none").value_counts().to_dict()},
        "levels": {level: _level_summary(table, level) for level in dataset.levels},
        "taxonomy_conflicts": taxonomy_conflicts(table, dataset.levels),
        "blank_levels": _blank_levels(table, dataset.levels),
        "reader_problems": _group_problems(dataset),
        "split_leaks": _split_leaks(dataset),
        "classes_without_training_images": _untrained_classes(table, dataset.default_level),
    }
    summary["too_few_to_split"] = _too_few_to_split(table, dataset.default_level)
    named = summary["levels"][dataset.default_level]
    if named["classes"] == 1:  # a classifier tells classes apart: train refuses one alone
        summary["one_class_only"] = [f"every image is '{named['largest'][0]}': add a folder "
                                     "(a class) of other images to tell it from"]
    if check_images:
        facts = _all_facts(table[PATH].tolist(), config.workers, progress)
        summary["images"] = _image_findings(table, facts, dataset.default_level, config)
        unreadable = {u["path"] for u in summary["images"]["unreadable"]}
        if unreadable:  # the classes as train counts them: of the images it can read
            table = table[~table[PATH].isin(unreadable)]
            summary["levels"] = {level: _level_summary(table, level) for level in dataset.levels}
            summary["levels_of"] = "readable images"
    plots = {}
    for level in dataset.levels:
        counts = table.loc[table[level] != "", level].value_counts()
        if len(counts):
            plot = plot_class_balance(counts, level, out_dir / f"balance_{name_part(level)}.png",
                                      config.many_classes)
            plots[level] = str(plot)
    summary["plots"] = plots
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def _blank_levels(table: pd.DataFrame, levels: list[str]) -> list[str]:
    """"path: no subfamily, genus" for each labelled image with a coarser level left blank
    (one line an image, so that the count is of images), which `train --levels` refuses
    (and a level's counts silently lack)."""
    coarser = levels[:-1]
    blank = table[coarser] == ""
    rows = (table[levels[-1]] != "") & blank.any(axis=1)
    named = zip(*(np.where(blank.loc[rows, lv], lv, "") for lv in coarser), strict=True)
    return [f"{path}: no {', '.join(filter(None, names))}"
            for path, names in zip(table.loc[rows, PATH], named, strict=True)]


def _level_summary(table: pd.DataFrame, level: str) -> dict:
    counts = table.loc[table[level] != "", level].value_counts()
    per_split = {
        split: part[level].value_counts().to_dict()
        for split, part in table[table[SPLIT] != ""].groupby(SPLIT)
    }
    return {
        "classes": len(counts),
        "unlabelled": int((table[level] == "").sum()),
        "imbalance_ratio": (round(float(counts.iloc[0] / counts.iloc[-1]), 2)
                            if len(counts) else None),
        "largest": [counts.index[0], int(counts.iloc[0])] if len(counts) else None,
        "smallest": [counts.index[-1], int(counts.iloc[-1])] if len(counts) else None,
        "counts": {k: int(v) for k, v in counts.items()},
        "counts_per_split": per_split,
    }


def _too_few_to_split(table: pd.DataFrame, level: str) -> list[str]:
    """Classes of data without a split that have too few independent images (groups) for
    train's default split to put one in each of train, val and test: it keeps them in train
    only, never evaluated (as `data split` and train say, once it is too late to add)."""
    if (table[SPLIT] != "").any():
        return []
    defaults = TrainConfig()
    sides = 1 + (defaults.val_fraction > 0) + (defaults.test_fraction > 0)
    labelled = table[table[level] != ""]
    groups = labelled.groupby(level)[GROUP].nunique()
    return [f"{name} ({counted(int(n), 'independent image')})"
            for name, n in groups[groups < sides].sort_values().items()]


def _split_leaks(dataset: Dataset) -> list[str]:
    """Groups and files the given splits put on two sides, which train refuses (identical
    pictures under two names are the duplicates' finding)."""
    leaks = find_leaks(dataset, by_content=False)
    return leaks.named("by_group") + leaks.named("by_path")


def _untrained_classes(table: pd.DataFrame, level: str) -> list[str]:
    """Classes that given splits hold in val or test only (a folder misspelt in valid/,
    say): train refuses them, as nothing can learn them."""
    train = table[SPLIT] == "train"
    if not train.any():
        return []
    held = table.loc[~train & (table[SPLIT] != "") & (table[level] != ""), [level, SPLIT]]
    learnt = set(table.loc[train, level])
    return [f"{name} (only in {'/'.join(sorted(set(part[SPLIT])))})"
            for name, part in held[~held[level].isin(learnt)].groupby(level)]


def _group_problems(dataset: Dataset) -> dict:
    grouped: dict[str, list] = defaultdict(list)
    for p in dataset.problems:
        grouped[p.kind].append(p.to_dict())
    return dict(grouped)


def _all_facts(paths: list[str], workers: int, progress: bool) -> list[ImageFacts]:
    # Decoding releases the GIL, so threads use every core without pickling anything. The
    # pool's threads do not see this call's context: its budget goes along.
    facts = functools.partial(image_facts, budget=max_pixels())
    with ThreadPoolExecutor(workers) as pool:
        return list(track(pool.map(facts, paths, chunksize=16), "Checking images",
                          total=len(paths), enabled=progress))


def _image_findings(table: pd.DataFrame, facts: list[ImageFacts], level: str,
                    config: InspectConfig) -> dict:
    unreadable = [{"path": f.path, "error": f.error} for f in facts if f.error]
    modes: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        if not f.error and f.mode in UNUSUAL_MODES:
            modes[f"{UNUSUAL_MODES[f.mode]} ({f.mode})"].append(f.path)
    tiny = [{"path": f.path, "size": [f.width, f.height]} for f in facts
            if not f.error and min(f.width, f.height) < config.tiny_px]
    readable = [f for f in facts if not f.error]
    # A class whose every file is unreadable counts its files above, yet gives training
    # nothing to learn from: said here, before `train` stops at it.
    read_ok = pd.Series([not f.error for f in facts], index=table.index)
    labelled = table[level] != ""
    per_class = read_ok[labelled].groupby(table.loc[labelled, level]).sum()
    sizes = pd.DataFrame([(f.width, f.height) for f in readable], columns=["w", "h"])
    return {
        "checked": len(facts),
        "unreadable": unreadable,
        "classes_without_readable_images": sorted(per_class[per_class == 0].index.tolist()),
        "duplicates": _duplicates(table, facts, level),
        "unusual_modes": dict(modes),
        "exif_rotated": [f.path for f in readable if f.exif_rotated],
        "tiny": tiny,
        "size": {"min": sizes.min().tolist(), "median": sizes.median().tolist(),
                 "max": sizes.max().tolist()} if len(sizes) else None,
        "formats": pd.Series([f.format for f in readable]).value_counts().to_dict(),
    }


def _duplicates(table: pd.DataFrame, facts: list[ImageFacts], level: str) -> dict:
    """Files with identical bytes; worst are those across splits or with two labels."""
    # Only pictures: unreadable files (an empty failed download, say) are listed as such.
    frame = table[[PATH, SPLIT, level]].assign(
        sha=[f.sha256 if f.error is None else None for f in facts])
    # One file listed twice (ETHEC lists some in val and test) is one picture: that leak is
    # the reader's to report, not a copy.
    frame = frame[frame["sha"].notna()].drop_duplicates(PATH)
    dup = frame[frame.duplicated("sha", keep=False)]
    groups = [
        {"paths": g[PATH].tolist(), "splits": sorted(set(g[SPLIT]) - {""}),
         "labels": sorted(set(g[level]))}
        for _, g in dup.groupby("sha", sort=False)
    ]
    return {
        "groups": groups,
        "extra_copies": sum(len(g["paths"]) - 1 for g in groups),
        "across_splits": [g for g in groups if len(g["splits"]) > 1],
        "conflicting_labels": [g for g in groups if len(g["labels"]) > 1],
    }


RANK_HEADINGS = ("[bold red]Fix first: train refuses these (each says when)[/]",
                 "[bold yellow]Then: train goes on, but these bias its figures[/]",
                 "[bold]Worth knowing: skipped or handled[/]")


def _folding(*headers: str) -> list[Column]:
    """Columns that fold a long class name onto more lines, never cut it with "…": at 60
    columns the largest and smallest classes read "Nymphali…", "Polyomma…" (as the
    CLI's tables do: see cli.common.folded_table)."""
    return [Column(header, overflow="fold") for header in headers]


def print_summary(summary: dict, console: Console | None = None) -> None:
    """A readable digest of `summary.json` for the terminal."""
    console = console or Console()
    d = summary["dataset"]
    splits = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
    console.print(f"[bold]{escape(d['name'])}[/] ({d['format']}): "
                  f"{counted(d['images'], 'image')}; "
                  f"splits: {splits}")
    levels = Table(*_folding("level", "classes", "largest", "smallest", "imbalance"),
                   title="Classes per level" + (f" ({summary['levels_of']})"
                                                if summary.get("levels_of") else ""))
    for name, lv in summary["levels"].items():
        if not lv["classes"]:
            continue
        levels.add_row(escape(name), str(lv["classes"]),
                       f"{escape(str(lv['largest'][0]))} ({lv['largest'][1]})",
                       f"{escape(str(lv['smallest'][0]))} ({lv['smallest'][1]})",
                       f"{lv['imbalance_ratio']}x")
    console.print(levels)

    # (title, items, count shown, rank): what to fix first comes first. 0: train refuses
    # the data or stops at it; 1: train goes on, but the figures it reports are biased;
    # 2: skipped or handled, worth knowing.
    findings: list[tuple[str, list[str], int | None, int]] = []
    for kind, items in summary["reader_problems"].items():
        general = [i["message"] for i in items if i["path"] is None]
        per_file = [f"{i['path']}: {i['message']}" for i in items if i["path"] is not None]
        findings.append((kind.replace("_", " "), general + per_file, len(per_file) or None,
                         1 if kind in BIASING_PROBLEMS else 2))
    # ETHEC's are repaired by train (each kept on one side); any other data's refused.
    ethec = summary["dataset"]["format"] == "ethec"
    findings += [(f"groups or files on two sides of the split "
                  f"({'train repairs them' if ethec else 'train refuses them'})",
                  summary.get("split_leaks", []), None, 2 if ethec else 0),
                 ("classes with no training image (train refuses them)",
                  summary.get("classes_without_training_images", []), None, 0),
                 ("one class only (train refuses it)", summary.get("one_class_only", []), None,
                  0),
                 ("classes too small to split: train keeps them in train only, never "
                  "evaluated (add images, or give a split)",
                  summary.get("too_few_to_split", []), None, 1),
                 ("taxonomy conflict (train --levels refuses it" + (
                     "; every extra column of a CSV is read as a coarser level: remove one "
                     "that is not (notes, a finer rank), and name one of specimen ids 'group'"
                     if summary["dataset"]["format"] == "csv"
                     else "") + ")", summary["taxonomy_conflicts"], None, 0),
                 ("blank at a level (train --levels refuses them in train and val)",
                  summary.get("blank_levels", []), None, 0)]
    images = summary.get("images")
    if images:
        dups = images["duplicates"]
        findings += [(title, items, None, rank) for title, items, rank in [
            ("unreadable or truncated",
             [f"{u['path']}: {u['error']}" for u in images["unreadable"]], 2),
            ("classes with no readable image (training stops at them)",
             images.get("classes_without_readable_images", []), 0),
            ("duplicate images (same bytes)", [" = ".join(g["paths"]) for g in dups["groups"]],
             2),
            ("duplicates across splits",
             [f"{' = '.join(g['paths'])} ({'/'.join(g['splits'])})"
              for g in dups["across_splits"]], 1),
            ("duplicates with different labels",
             [f"{' = '.join(g['paths'])} ({'/'.join(g['labels'])})"
              for g in dups["conflicting_labels"]], 1),
            *[(f"mode: {m}", paths, 2) for m, paths in images["unusual_modes"].items()],
            ("EXIF rotation (will be applied)", images["exif_rotated"], 2),
            ("tiny images", [f"{t['path']} ({t['size'][0]}x{t['size'][1]})"
                             for t in images["tiny"]], 2),
        ]]
    flagged = sorted((f for f in findings if f[1]), key=lambda f: f[3])  # stable: in kind
    if not flagged:
        console.print("[green]No problems found.[/]")
    heading = None
    for title, items, count, rank in flagged:
        if rank != heading:
            heading = rank
            console.print(RANK_HEADINGS[rank])
        console.print(f"[yellow]{title}[/]: {count or len(items)}")
        for item in items[:EXAMPLES]:
            console.print(f"  {escape(str(item))}", highlight=False)
        if len(items) > EXAMPLES:
            console.print(f"  ... {len(items) - EXAMPLES} more in summary.json")
    if images and images["size"]:
        s = images["size"]
        # Each side on its own: the narrowest image need not be the shortest.
        sides = [f"{name} " + (f"{s['min'][i]} px" if s["min"][i] == s["max"][i] else
                               f"{s['min'][i]}-{s['max'][i]} px (median {s['median'][i]:g})")
                 for i, name in enumerate(("widths", "heights"))]
        console.print(f"Image sizes: {', '.join(sides)}")


def print_class_table(dataset: Dataset, level: str, console: Console, limit: int = 30) -> None:
    """Images per class at one level, by split when there are splits (images left blank
    at the level are no class: the findings list them)."""
    table = dataset.table[dataset.table[level] != ""]
    # Images of no split: "none", as the summary's line calls them; with no split at all,
    # the total alone.
    counts = pd.crosstab(table[level], table[SPLIT].replace("", "none")) if len(table) else None
    if counts is None or counts.empty:
        return
    counts["total"] = counts.sum(axis=1)
    counts = counts.sort_values("total", ascending=False)
    cols = [c for c in ["train", "val", "test", "none"] if c in counts.columns
            and dataset.has_splits] + ["total"]
    shown = counts if len(counts) <= limit else pd.concat([counts.head(limit // 2),
                                                           counts.tail(limit // 2)])
    classes = counted(len(counts), "class", "classes")
    view = Table(*_folding(escape(level), *cols), title=f"Images per {escape(level)} ({classes}"
                 + (f", largest and smallest {limit // 2} shown)" if len(counts) > limit else ")"))
    for i, (name, row) in enumerate(shown.iterrows()):
        if len(counts) > limit and i == limit // 2:
            view.add_row("...", *["" for _ in cols])
        view.add_row(escape(str(name)), *[str(int(row[c])) for c in cols])
    console.print(view)
