"""Higher taxonomic levels from a `taxonomy.csv`, and checks that a hierarchy is a tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.data.csvfiles import name_as_read, read_csv
from wingspan.data.samples import GROUP, PATH, SPLIT, Problem
from wingspan.errors import WingspanError, some

TAXONOMY_FILE = "taxonomy.csv"


def read_taxonomy(path: Path) -> pd.DataFrame:
    """Read `folder,<level>,...` as a table indexed by folder (the class name).

    A `genus` + `specific_epithet` pair becomes a `species` level ("Danaus plexippus"),
    the way taxonomists write it.
    """
    tax = read_csv(path, key="folder")
    # "monarch " is the folder "monarch", and a decomposed é the composed one.
    tax = tax.apply(lambda column: column.map(name_as_read))
    if "folder" not in tax.columns or len(tax.columns) < 2:
        raise WingspanError(
            f"{path} must have a 'folder' column and at least one level column "
            f"(its columns: {some(tax.columns)}).",
            hint="Write it as: folder,family,subfamily,genus,specific_epithet",
        )
    reserved = sorted({PATH, SPLIT, GROUP, "label"} & set(tax.columns))
    if reserved:
        raise WingspanError(
            f"{path} has a column named {reserved[0]!r}: the name of a column of the sample "
            "table, not a taxonomic level.",
            hint="Name the levels after the ranks they are (family, genus, ...).")
    if tax["folder"].duplicated().any():
        dup = tax.loc[tax["folder"].duplicated(), "folder"].tolist()
        raise WingspanError(f"{path} lists these folders more than once: {some(dup)}.",
                            hint="Keep one row per folder: each class has one parent.")
    if {"genus", "specific_epithet"} <= set(tax.columns):
        tax["species"] = binomial(tax["genus"], tax["specific_epithet"])
        tax = tax.drop(columns="specific_epithet")
    return tax.set_index("folder")


def binomial(genus: pd.Series, epithet: pd.Series) -> pd.Series:
    """"Danaus plexippus" from its genus and specific epithet; empty (no species: a gap
    that is reported) when either is blank, not the genus alone, which would merge every
    species of the genus that lacks an epithet into one."""
    genus, epithet = genus.str.strip(), epithet.str.strip()
    return (genus + " " + epithet).where((genus != "") & (epithet != ""), "")


# Ranks in their order: levels named after them keep it, whatever their class counts (a
# tie, one genus per family in a small collection, or a genus under two families).
RANKS = ["kingdom", "phylum", "class", "order", "superfamily", "family", "subfamily",
         "tribe", "subtribe", "genus", "subgenus", "species", "subspecies"]


def coarse_to_fine(table: pd.DataFrame, columns: list[str]) -> list[str]:
    """Level columns ordered coarse to fine, whatever order a file has them in: a coarser
    level has fewer classes among the rows that give every level (a level filled in for
    one family only has few classes overall); then among all rows. A tie makes the same
    tree either way: levels named after ranks then go in rank order, others keep the
    file's order. Levels named after ranks keep rank order among themselves whatever their
    counts: a genus with fewer classes than family is a taxonomy that contradicts itself
    (one genus under two families), which must be refused as such, not read as a tree with
    genus above family."""
    full = table[(table[columns] != "").all(axis=1)]
    counts = {c: (full[c].nunique(), table.loc[table[c] != "", c].nunique()) for c in columns}
    ordered = sorted(columns, key=counts.__getitem__)  # (stable: a tie keeps the file's order)
    ranked = iter(sorted((c for c in ordered if c.lower() in RANKS),
                         key=lambda c: RANKS.index(c.lower())))
    return [next(ranked) if c.lower() in RANKS else c for c in ordered]


def apply_taxonomy(
    table: pd.DataFrame, key: str, tax: pd.DataFrame, source: Path
) -> tuple[pd.DataFrame, list[str], list[Problem]]:
    """Add the taxonomy's levels to the table, joined on its `key` column.

    Returns the table, the added levels (coarse to fine) and a problem for each class
    the taxonomy does not list (its higher levels are left empty).
    """
    levels = coarse_to_fine(tax, [c for c in tax.columns if c != key])
    joined = table.join(tax[levels], on=key)
    # A row spelt in another case ('008-Pieris_Rapae') is the likeliest slip: named.
    used = set(table[key])
    unused = {str(row).casefold(): row for row in tax.index if row not in used}
    problems = [
        Problem("taxonomy_missing", f"Class '{c}' is not in {source}; its higher levels are "
                "empty." + (f" Its row '{unused[c.casefold()]}' differs only in case: write "
                            "it as the folder is named." if c.casefold() in unused else ""))
        for c in sorted(joined.loc[joined[levels[0]].isna(), key].unique())
    ]
    # Two class folders given one species (a row copied and not edited) become one class
    # at that level: said, as nothing else would show it ("species: 5 classes" of 6).
    finest = tax.loc[tax.index.isin(used), levels[-1]].dropna()
    finest = finest[(finest != "") & (levels[-1] in ("species", "subspecies"))]
    for name, folders in finest.groupby(finest).groups.items():
        if len(folders) > 1:
            problems.append(Problem(
                "taxonomy_merges", f"The class folders {some(sorted(folders))} are all "
                f"{levels[-1]} '{name}' in {source}: at that level they are one class. "
                "Correct their rows if they are different species.", str(source)))
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


class Taxonomy:
    """The class tree over several levels (coarse to fine), as index arrays.

    `parents[level][f]` is the index, at `level`, of finest class `f`'s ancestor; with it,
    finest-level probabilities sum up the tree (marginalisation) and a prediction can be
    made top-down so that its levels always agree.
    """

    def __init__(self, levels: list[str], classes: dict[str, list[str]],
                 parents: dict[str, list[int]]):
        self.levels, self.classes = list(levels), classes
        self.parents = {lv: np.asarray(p, dtype=np.int64) for lv, p in parents.items()}
        self.finest = self.levels[-1]
        # sums[lv][f, c]: finest class f lies under class c of lv, for each coarser level.
        # Made once: predict asks per image, and making them took most of its 0.7 ms an
        # image at 561 species. Sparse: dense, with the finest level's identity, they took
        # 1.28 GB and 73 ms an image at 10,000 species (0.3 MB and 0.12 ms so).
        from scipy import sparse  # (here: predict and serve start without scipy's import)

        self.sums = {lv: sparse.csr_array((np.ones(len(p)), (np.arange(len(p)), p)),
                                          shape=(len(p), len(self.classes[lv])))
                     for lv, p in self.parents.items() if lv != self.finest}
        # Each level's classes' parents one level up, for the top-down walk (made once too).
        self._up = {lv: self.parent_of(lv, coarser)
                    for coarser, lv in zip(self.levels, self.levels[1:], strict=False)}

    @property
    def member(self) -> dict[str, np.ndarray]:
        """Each coarser level's finest x level 0/1 matrix, dense: the unknown scores and
        the exported graph hold it as a tensor."""
        return {lv: m.toarray() for lv, m in self.sums.items()}

    @classmethod
    def from_table(cls, table: pd.DataFrame, levels: list[str]) -> Taxonomy:
        """Build the tree from labelled rows; a class under two parents is an error that
        names example rows, since no consistent prediction could be made."""
        conflicts = conflict_rows(table, levels)
        if conflicts:
            raise WingspanError(
                "The taxonomy contradicts itself:\n  " + "\n  ".join(conflicts[:10]),
                hint="Fix the labels of those rows (or taxonomy.csv) so that every class "
                "has exactly one parent.")
        finest = levels[-1]
        fine_classes = sorted(table[finest].unique())
        first = table.drop_duplicates(finest).set_index(finest)
        classes = {lv: sorted(table[lv].unique()) for lv in levels}
        parents = {}
        for lv in levels:
            index = {c: i for i, c in enumerate(classes[lv])}
            parents[lv] = [index[first.loc[f, lv] if lv != finest else f] for f in fine_classes]
        classes[finest] = fine_classes
        return cls(levels, classes, parents)

    def to_dict(self) -> dict:
        return {"levels": self.levels, "classes": self.classes,
                "parents": {lv: p.tolist() for lv, p in self.parents.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Taxonomy:
        return cls(d["levels"], d["classes"], d["parents"])

    def marginals(self, fine_probs: np.ndarray) -> dict[str, np.ndarray]:
        """P(class at each level) = the sum of its finest descendants' probabilities."""
        # (clipped: a float64 sum of float32 probabilities may pass 1 by 1e-11; the finest
        # level is its own, not a product with an identity of 561 x 561)
        fine_probs = np.asarray(fine_probs, dtype=np.float64)
        return {lv: np.clip(fine_probs @ self.sums[lv] if lv != self.finest else fine_probs,
                            0.0, 1.0) for lv in self.levels}

    def predict(self, fine_probs: np.ndarray, *, temperature: float) -> dict[str, np.ndarray]:
        """Top-down on the marginals: the likeliest family, then the likeliest genus in
        that family, and so on. Every predicted path is a real branch of the tree.

        `fine_probs` are softmax(logits / temperature); the branch is chosen on them at
        temperature 1 (softmax(z / T) ** T is proportional to softmax(z)), the model's own,
        on which training chose its epoch. So a temperature changes the probabilities
        shown, never the answer, as for a flat model: on sums of calibrated probabilities
        a temperature of 10 (fitted on shifted photos) changed 13 of 23 answers, and
        accuracy fell from 0.30 to 0.17, while calibrating was meant to change neither."""
        if temperature != 1.0:
            fine_probs = np.asarray(fine_probs, dtype=np.float64) ** temperature
            fine_probs = fine_probs / fine_probs.sum(-1, keepdims=True)
        marg = self.marginals(fine_probs)
        chosen: dict[str, np.ndarray] = {}
        previous = None
        for lv in self.levels:
            scores = marg[lv].copy()
            if previous is not None:
                scores[self._up[lv][None, :] != chosen[previous][:, None]] = -1.0
            chosen[lv] = scores.argmax(1)
            previous = lv
        return chosen

    def answer(self, fine_probs: np.ndarray, *, temperature: float) -> np.ndarray:
        """The finest class of each top-down branch: the class predict answers, which may
        differ from the flat argmax (a likelier family whose species are each less likely)."""
        return self.predict(fine_probs, temperature=temperature)[self.finest]

    def parent_of(self, level: str, parent_level: str) -> np.ndarray:
        """For each class at `level`, its parent's index at `parent_level`."""
        out = np.zeros(len(self.classes[level]), dtype=np.int64)
        out[self.parents[level]] = self.parents[parent_level]
        return out

    def consistent(self, preds: dict[str, np.ndarray]) -> np.ndarray:
        """Whether each prediction's levels lie on one branch (independent heads may not)."""
        ok = np.ones(len(preds[self.levels[0]]), dtype=bool)
        for parent, child in zip(self.levels[:-1], self.levels[1:], strict=True):
            ok &= self.parent_of(child, parent)[preds[child]] == preds[parent]
        return ok

    def mistake_depth(self, preds: dict[str, np.ndarray], truth: dict[str, np.ndarray]
                      ) -> np.ndarray:
        """How many levels up the tree prediction and truth meet: 0 = right at the finest
        level, 1 = same parent (e.g. right genus, wrong species), len(levels) = different
        already at the top."""
        n = len(truth[self.levels[0]])
        depth = np.zeros(n, dtype=np.int64)
        for k, lv in enumerate(self.levels):  # (no truth at a level, -1: not wrong there)
            wrong = (preds[lv] != truth[lv]) & (truth[lv] >= 0) & (depth == 0)
            depth[wrong] = len(self.levels) - k
        return depth


def conflict_rows(table: pd.DataFrame, levels: list[str]) -> list[str]:
    """Like `taxonomy_conflicts`, with an example row (file) for each parent."""
    found = []
    for i, fine in enumerate(levels):
        for coarse in levels[:i]:
            pairs = table[[fine, coarse, "path"]]
            counts = pairs.groupby(fine)[coarse].nunique()
            for name in counts[counts > 1].index:
                rows = pairs[pairs[fine] == name].drop_duplicates(coarse)
                found.append(f"{fine} '{name}' is under {len(rows)} {coarse} values: " + ", ".join(
                    f"'{r[coarse]}' (e.g. {r['path']})" for _, r in rows.iterrows()))
    return found
