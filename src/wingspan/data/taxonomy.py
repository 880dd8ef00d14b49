"""Higher taxonomic levels from a `taxonomy.csv`, and checks that a hierarchy is a tree."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from wingspan.data.samples import Problem
from wingspan.errors import WingspanError

TAXONOMY_FILE = "taxonomy.csv"


def read_taxonomy(path: Path) -> pd.DataFrame:
    """Read `folder,<level>,...` as a table indexed by folder (the class name).

    A `genus` + `specific_epithet` pair becomes a `species` level ("Danaus plexippus"),
    the way taxonomists write it.
    """
    try:
        tax = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise WingspanError(f"Cannot read the taxonomy file {path}: {e}") from e
    if "folder" not in tax.columns or len(tax.columns) < 2:
        raise WingspanError(
            f"{path} must have a 'folder' column and at least one level column.",
            hint="Write it as: folder,family,subfamily,genus,specific_epithet",
        )
    if tax["folder"].duplicated().any():
        dup = tax.loc[tax["folder"].duplicated(), "folder"].tolist()
        raise WingspanError(f"{path} lists these folders more than once: {dup[:10]}")
    if {"genus", "specific_epithet"} <= set(tax.columns):
        tax["species"] = (tax["genus"] + " " + tax["specific_epithet"]).str.strip()
        tax = tax.drop(columns="specific_epithet")
    return tax.set_index("folder")


def apply_taxonomy(
    table: pd.DataFrame, key: str, tax: pd.DataFrame, source: Path
) -> tuple[pd.DataFrame, list[str], list[Problem]]:
    """Add the taxonomy's levels to the table, joined on its `key` column.

    Returns the table, the added levels (coarse to fine) and a problem for each class
    the taxonomy does not list (its higher levels are left empty).
    """
    levels = [c for c in tax.columns if c != key]
    joined = table.join(tax[levels], on=key)
    problems = [
        Problem("taxonomy_missing", f"Class '{c}' is not in {source}; its higher levels are empty.")
        for c in sorted(joined.loc[joined[levels[0]].isna(), key].unique())
    ]
    joined[levels] = joined[levels].fillna("")
    return joined, levels, problems


def taxonomy_conflicts(table: pd.DataFrame, levels: list[str]) -> list[str]:
    """Each class that sits under two parents (one genus in two families, say).

    Compares every level with each coarser one, so a gap in the middle is caught too.
    """
    found = []
    for i, fine in enumerate(levels):
        for coarse in levels[:i]:
            pairs = table[[fine, coarse]].drop_duplicates()
            pairs = pairs[(pairs[fine] != "") & (pairs[coarse] != "")]
            counts = pairs.groupby(fine)[coarse].nunique()
            for name in counts[counts > 1].index:
                parents = sorted(pairs.loc[pairs[fine] == name, coarse])
                found.append(f"{fine} '{name}' is under {len(parents)} {coarse} values: {parents}")
    return found
