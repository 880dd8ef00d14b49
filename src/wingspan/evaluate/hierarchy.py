"""Metrics per taxonomic level: marginalised predictions, per-level heads, consistency,
and how far up the tree mistakes go."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from wingspan.data.samples import renamed
from wingspan.data.taxonomy import Taxonomy
from wingspan.evaluate.metrics import macro_f1


def _scores(y: np.ndarray, pred: np.ndarray, truth_only: bool = False) -> dict:
    """`truth_only`: macro over the classes in `y` alone (other data holding a few of the
    model's classes), as `classification_metrics` averages it."""
    if not len(y):  # no row has a truth at this level
        return {"accuracy": float("nan"), "micro_f1": float("nan"), "macro_f1": float("nan")}
    return {"accuracy": float(accuracy_score(y, pred)),
            "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
            "macro_f1": macro_f1(y, pred, truth_only=truth_only)}


def truth_indices(taxonomy: Taxonomy, rows: pd.DataFrame, rare: dict[str, str]
                  ) -> dict[str, np.ndarray]:
    """Class index per level for each row (-1 where the model does not know the class);
    rare finest classes count as the parent-level class they were trained as. A coarser
    level the rows lack (photos in species folders, no taxonomy.csv) is the model's own
    parent of the finest label."""
    def indices(level: str, labels: pd.Series) -> np.ndarray:
        index = {c: i for i, c in enumerate(taxonomy.classes[level])}
        return labels.map(index).fillna(-1).astype(int).to_numpy()

    fine = indices(taxonomy.finest, renamed(rows[taxonomy.finest], rare))
    out = {lv: indices(lv, rows[lv]) if lv in rows
           else np.where(fine >= 0, taxonomy.parents[lv][np.maximum(fine, 0)], -1)
           for lv in taxonomy.levels[:-1]}
    return {**out, taxonomy.finest: fine}


def hierarchical_metrics(taxonomy: Taxonomy, truth: dict[str, np.ndarray],
                         fine_probs: np.ndarray, heads: dict[str, np.ndarray] | None,
                         is_rare: np.ndarray, truth_only: bool = False, *,
                         temperature: float) -> dict:
    """`truth`: index per level; `fine_probs` at `temperature` (the branch is chosen as at
    1, `Taxonomy.predict`); `heads`: each coarser level's own probabilities; `truth_only`:
    macro averages over the classes the rows hold (see `_scores`)."""
    marg = taxonomy.predict(fine_probs, temperature=temperature)
    own = None
    if heads:
        own = {lv: heads[lv].argmax(1) for lv in taxonomy.levels if lv in heads}
        own[taxonomy.finest] = fine_probs.argmax(1)
    levels = {}
    for lv in taxonomy.levels:
        # A row with no class the model knows at this level (blank there, or a name the
        # model's tree lacks) has no truth to score here: left out of this level's figures
        # and counted, not scored as a class of its own that no prediction can match.
        known = truth[lv] >= 0
        entry = _scores(truth[lv][known], marg[lv][known], truth_only)
        if own is not None:
            entry["heads"] = _scores(truth[lv][known], own[lv][known], truth_only)
        if not known.all():
            entry["no_truth"] = int((~known).sum())
        levels[lv] = entry
    # Where the data leaves a coarser level blank, the model's tree says it from the finest
    # truth: skipped, a wrong genus left blank counted as "right genus, wrong species"
    fine = truth[taxonomy.finest]
    tree_truth = {lv: np.where((t < 0) & (fine >= 0),
                               taxonomy.parents[lv][np.maximum(fine, 0)], t)
                  for lv, t in truth.items()}
    depth = taxonomy.mistake_depth(marg, tree_truth)
    result = {
        "levels": levels,
        "consistency": {"marginalised": float(taxonomy.consistent(marg).mean()),
                        "heads": float(taxonomy.consistent(own).mean()) if own else None},
        "mistake_depth": {str(d): int((depth == d).sum()) for d in np.unique(depth)},  # (JSON keys)
        "mean_mistake_depth": float(depth.mean()),
    }
    if is_rare.any():  # (over the images with a truth at the level, as the levels' own)
        scored = {lv: is_rare & (truth[lv] >= 0) for lv in taxonomy.levels}
        result["rare"] = {"images": int(is_rare.sum()), "accuracy": {
            lv: float((marg[lv][scored[lv]] == truth[lv][scored[lv]]).mean())
            if scored[lv].any() else None for lv in taxonomy.levels}}
    result["predictions"] = marg
    return result


def level_table(metrics: dict, levels: list[str]) -> pd.DataFrame:
    """F1 per level: micro-F1 like the published ETHEC baseline table, and macro-F1 (rare
    classes count as much as common ones), each row naming its figure (levels.csv, the
    terminal and the report show this one table)."""
    rows = [{"method": "micro-F1, marginalisation (consistent)",
             **{lv: metrics["levels"][lv]["micro_f1"] for lv in levels}},
            {"method": "macro-F1, marginalisation",
             **{lv: metrics["levels"][lv]["macro_f1"] for lv in levels}}]
    if "heads" in metrics["levels"][levels[0]]:
        rows.append({"method": "micro-F1, per-level heads",
                     **{lv: metrics["levels"][lv]["heads"]["micro_f1"] for lv in levels}})
    return pd.DataFrame(rows)


def class_ancestors(taxonomy, level: str) -> tuple[np.ndarray, list[str]] | None:
    """A level's classes' ancestors (coarse to fine, a row a class) and those levels'
    names. None at the coarsest level, or without a taxonomy."""
    coarser = taxonomy.levels[:taxonomy.levels.index(level)] if taxonomy else []
    if not coarser:
        return None
    return np.stack([taxonomy.parent_of(level, c) for c in coarser], axis=1), coarser


def confusion_tree(taxonomy, level: str) -> tuple[np.ndarray, list[str], str] | None:
    """A level's classes' ancestors, the coarsest level's names and its name:
    plot_confusion's order down the tree. None at the coarsest, or without a taxonomy."""
    if (ancestry := class_ancestors(taxonomy, level)) is None:
        return None
    ancestors, coarser = ancestry
    return ancestors, list(taxonomy.classes[coarser[0]]), coarser[0]
