"""Leaks between the sides of a split: one specimen, one file or one picture on two sides.

An image that is both trained on and evaluated on makes the score a memory test. Three
ways it happens: a group (specimen, observation) on two sides; one file listed on two
sides (ETHEC's published splits have 51 images in both val and test); and the same
picture saved twice under two names. The last needs the files' bytes, so it is found by
hashing them (hand-written: no library groups files by content for a split).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from wingspan.data.samples import GROUP, PATH, SPLIT, Dataset

# Which side keeps a leaked image: train (so the model still learns it), else test (the
# final check stays as large as possible), else val.
KEEP_ORDER = ("train", "test", "val")


def content_hashes(paths: list[str]) -> list[str]:
    """sha256 of each file's bytes; "" for a file that cannot be read or is empty (every
    failed download would otherwise be one picture, on every side)."""
    out = []
    for path in paths:
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            out.append(digest.hexdigest() if size else "")
        except OSError:
            out.append("")
    return out


def with_duplicates_grouped(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The table with the groups of identical files merged into one (so a split keeps
    copies together), and how many groups were merged away."""
    hashes = pd.Series(content_hashes(table[PATH].tolist()), index=table.index)
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    # Only the pictures held more than once: a loop over every file's own hash is seconds
    # of pandas per 10k files.
    shared = hashes[(hashes != "") & hashes.duplicated(keep=False)]
    for _, groups in table.loc[shared.index, GROUP].groupby(shared):
        for g in groups.iloc[1:]:
            # A merged group is named by the least of its names, whatever the rows' order:
            # the same data listed in another order then splits alike under one seed.
            a, b = sorted((root(groups.iloc[0]), root(g)))
            if a != b:
                parent[b] = a
    if not parent:
        return table, 0
    table = table.copy()
    table[GROUP] = [root(g) for g in table[GROUP]]
    return table, len(parent)


@dataclass
class Leaks:
    """Rows (table index) that share a group, a file or a picture with another side."""

    by_group: dict[str, list[str]]  # group -> its sides
    by_path: dict[str, list[str]]
    by_content: dict[str, list[str]]  # sha256 -> its sides
    rows: dict[str, np.ndarray]  # kind -> row positions involved
    hashes: pd.Series | None = None  # of the labelled rows, for repair_leaks to reuse
    paths: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # kind -> key -> files

    def __bool__(self) -> bool:
        return bool(self.by_group or self.by_path or self.by_content)

    def describe(self, examples: int = 1) -> str:
        """Counts per kind and side, each with up to `examples` of its leaks named (with
        48k images, "1 group on two sides" alone cannot be found)."""
        parts = []
        for kind, what in (("by_group", "groups"), ("by_path", "files"),
                           ("by_content", "identical pictures")):
            found = getattr(self, kind)
            if found:
                sides = pd.Series(["+".join(sorted(s)) for s in found.values()]).value_counts()
                what = what if len(found) > 1 else what[:-1]  # "1 file", not "1 files"
                named = self.named(kind)[:examples]
                parts.append(f"{len(found)} {what} on two sides ("
                             + ", ".join(f"{n} in {s}" for s, n in sides.items()) + ")"
                             + (f", e.g. {'; '.join(named)}" if named else ""))
        return "; ".join(parts)

    def named(self, kind: str) -> list[str]:
        """Each leak of a kind in words, with its files and sides."""
        found, paths = getattr(self, kind), self.paths.get(kind, {})
        return [(f"group '{key}' ({', '.join(paths.get(key, []))})" if kind == "by_group" else
                 key if kind == "by_path" else " = ".join(paths.get(key, [])))
                + f" on {'+'.join(sorted(sides))}" for key, sides in found.items()]


def find_leaks(dataset: Dataset, by_content: bool = True) -> Leaks:
    """Each leak once: one file listed on two sides is a file's leak, not also a picture's
    (its bytes) and a group's (by default a group is one file), so a group counts only
    when it holds more than one picture, and a picture only under more than one name."""
    table = dataset.table[dataset.table[SPLIT] != ""]
    found, rows, paths = {}, {}, {}
    keys = {"by_group": table[GROUP], "by_path": table[PATH]}
    picture = table[PATH]  # one picture: one content, else (not hashed, unreadable) one file
    if by_content:
        hashes = pd.Series(content_hashes(table[PATH].tolist()), index=table.index)
        keys["by_content"] = hashes.where(hashes != "")
        picture = hashes.where(hashes != "", table[PATH])
    holds = {"by_group": picture, "by_content": table[PATH]}  # what each must hold 2 of
    for kind, key in keys.items():
        # Counted by whole columns; the sides listed in Python for the leaked keys alone
        # (a lambda per key took seconds on ETHEC's 48k files).
        sides = table[SPLIT].groupby(key).nunique()
        leaked = sides.index[sides.to_numpy() > 1]
        if kind in holds:
            leaked = leaked[(holds[kind].groupby(key).nunique().reindex(leaked) > 1).to_numpy()]
        on = key.isin(leaked)
        found[kind] = (table.loc[on, SPLIT].groupby(key[on]).agg(lambda s: sorted(set(s)))
                       .to_dict())
        paths[kind] = table.loc[on, PATH].groupby(key[on]).agg(lambda s: sorted(set(s))).to_dict()
        rows[kind] = np.flatnonzero(on.to_numpy())
    found.setdefault("by_content", {})
    return Leaks(found["by_group"], found["by_path"], found["by_content"], rows,
                 hashes if by_content else None, paths)


def repair_leaks(dataset: Dataset, leaks: Leaks | None = None) -> tuple[Dataset, int]:
    """Keep each leaked group, file or picture on one side only (KEEP_ORDER), dropping its
    rows from the others; returns the repaired dataset and the number of rows dropped.
    `leaks` (from find_leaks on the same dataset) saves hashing the files again."""
    table = dataset.table
    labelled = table[table[SPLIT] != ""]
    hashes = (leaks.hashes if leaks is not None and leaks.hashes is not None else
              pd.Series(content_hashes(labelled[PATH].tolist()), index=labelled.index))
    drop = pd.Series(False, index=table.index)
    # Each row's side by KEEP_ORDER's preference: a key keeps its most preferred side.
    rank = labelled[SPLIT].map({side: i for i, side in enumerate(KEEP_ORDER)})
    for key in (labelled[GROUP], labelled[PATH], hashes.where(hashes != "")):
        kept = rank.groupby(key).transform("min")  # NaN where the key is (an unread file)
        drop.loc[labelled.index] |= kept.notna() & (kept != rank)
    return dataset.subset((~drop).to_numpy()), int(drop.sum())
