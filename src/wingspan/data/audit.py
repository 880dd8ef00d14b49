"""`wingspan data audit`: images whose label is likely wrong, and near-duplicates.

Label errors, confident-learning style: every labelled image gets a class probability
from a logistic head that never saw it (k-fold over frozen ImageNet features), and
cleanlab ranks the images by how little that probability believes the given label.
Near-duplicates, within and across splits: perceptual hashes (imagehash) for a copy that
was resized or re-encoded, which the byte-level check of `wingspan.data.leaks` misses,
and cosine similarity of the features for the same scene taken twice.

Writes audit.csv (every readable image whose label could be checked: not a class of one
image, most suspect first), duplicates.csv and audit.html (a gallery: the image, its
label, the suspected label, the score).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from wingspan.config import AUDIT_BACKBONES, AuditConfig, default_cache_dir
from wingspan.data.images import budget_key, max_pixels, open_rgb, skip_reason
from wingspan.data.samples import GROUP, PATH, SPLIT, Dataset
from wingspan.errors import WingspanError, counted, rounded
from wingspan.files import (
    FileArrays,
    atomic_paths,
    check_folder_writable,
    frame_to_csv,
    remove_dead_leftovers,
)
from wingspan.pages import breakable, cards_page, thumbnail_uri
from wingspan.progress import status, track

if TYPE_CHECKING:
    from wingspan.models.classifier import Classifier, Preprocessing
    from wingspan.models.weights import LoadedWeights


@dataclass
class AuditResult:
    issues: pd.DataFrame  # every labelled image, most suspect first
    duplicates: pd.DataFrame  # pairs at or above the similarity
    csv: Path
    duplicates_csv: Path
    html: Path
    backbone: str
    # Classes of one image: no other of their class to learn from out of fold, so their
    # labels are not checked (their images are in the duplicate search all the same).
    single_image_classes: list[str] = dataclasses.field(default_factory=list)
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)  # path: why
    checker: dict = dataclasses.field(default_factory=dict)  # checker_scores(issues)


def audit_dataset(dataset: Dataset, out_dir: str | Path, level: str | None = None,
                  config: AuditConfig | None = None, progress: bool = True,
                  strict: bool = False) -> AuditResult:
    """`strict`: an image that cannot be read stops the audit (as `train --strict`), else
    it is left out and listed."""
    config = config or AuditConfig()
    level = dataset.resolve_level(level)
    table = dataset.table[dataset.table[level] != ""]
    # Each file once: a splits.csv from `split --oversample-to` repeats training rows, and a
    # repeat would be its own near-duplicate, and on both sides of the cross-validation.
    table = table.drop_duplicates(PATH).reset_index(drop=True)
    counts = table[level].value_counts()
    if len(counts) < 2:
        raise WingspanError(f"An audit needs at least 2 classes at level '{level}'; "
                            f"found {len(counts)}.")
    _check_enough_to_check(_independent(table, level), level)  # before the features
    check_folder_writable(out_dir, f"the audit's files go to {out_dir}",  # (not after them)
                          hint="Give --out a folder you can write to.")
    features, hashes, backbone, failed, what = image_features(table[PATH].tolist(), config,
                                                              progress)
    if strict and failed:
        path, why = next(iter(failed.items()))
        raise WingspanError(f"{counted(len(failed), 'image')} cannot be read (--strict), "
                            f"e.g. {path}: {why}", hint="Fix or remove them, or leave --strict "
                            "out to audit the rest (the unreadable ones are listed).")
    ok = np.array([p not in failed for p in table[PATH]])
    table, hashes = table[ok].reset_index(drop=True), hashes[ok]
    # Each backbone's features at unit length, side by side: each weighs alike in the head.
    first = features[0][ok]
    features = torch.cat([torch.nn.functional.normalize(f[ok], dim=1) for f in features], 1)
    if table[level].nunique() < 2:
        raise WingspanError(
            f"An audit needs at least 2 classes at level '{level}' with readable images; "
            f"{len(failed)} of {len(ok)} images could not be read (e.g. "
            f"{next(iter(failed), '-')}), which leaves {table[level].nunique()}.",
            hint="Fix or remove the unreadable images (`wingspan data inspect` lists them).")
    counts = _independent(table, level)
    _check_enough_to_check(counts, level)  # (again: unreadable images may leave fewer)
    alone = sorted(counts[counts < 2].index)
    checked = ~table[level].isin(alone).to_numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # (only now: a refused audit leaves none)
    # (minutes on tens of thousands of images and hundreds of classes: said while it runs)
    # (an hour on 40k images of 1,000 classes on 2 cores: a bar with its time to go)
    issues = label_issues(table[checked].reset_index(drop=True), features[checked], level,
                          config, progress)
    with status("Looking for near-duplicates", progress):
        duplicates = near_duplicates(table, first, hashes, level, config)
    page = gallery(issues, duplicates, level, config, what, failed, alone)  # the slow part
    paths = out_dir / "audit.csv", out_dir / "duplicates.csv", out_dir / "audit.html"
    # Replaced together: a killed or failed audit leaves the previous audit's three files,
    # never new tables beside an old page (but for a kill between the renames: see
    # atomic_paths). Not a whole new folder: it holds inspect's and split's outputs too.
    remove_dead_leftovers(*paths)  # (each killed audit's kept page and tables)
    with atomic_paths(*paths) as (csv_tmp, dup_tmp, page_tmp):
        frame_to_csv(issues, csv_tmp)
        frame_to_csv(duplicates, dup_tmp)
        page_tmp.write_text(page, encoding="utf-8")
    return AuditResult(issues, duplicates, *paths, backbone, alone, failed,
                       checker_scores(issues, config.weak_checker))


def _independent(table: pd.DataFrame, level: str) -> pd.Series:
    """Each class's independent images: its groups (one observation's photos share a fold,
    so a class of one observation has none of its own in the folds that score it)."""
    return table.groupby(level)[GROUP].nunique()


def _check_enough_to_check(counts: pd.Series, level: str) -> None:
    """A label is checked by heads trained on its class's other images (groups): at least
    2 classes must have 2 or more."""
    alone = int((counts < 2).sum())
    if (counts >= 2).sum() < 2:
        raise WingspanError(
            f"A label audit needs at least 2 classes with 2 images or more (2 groups, with "
            f"--group-regex) at level '{level}'; {alone} of the "
            f"{counted(len(counts), 'class', 'classes')} "
            f"{'has' if alone == 1 else 'have'} a single image (or group).",
            hint="Audit a coarser level (--level), or give those classes more images.")


def fold_count(labels: pd.Series, config: AuditConfig) -> int:
    """config.folds, or fewer when even the largest class has fewer images. A class with
    fewer images than folds is in fewer test folds, and still in every training fold
    when it has 2 or more: fewer folds for all would only train every head on less."""
    return max(2, min(config.folds, int(labels.value_counts().max())))


class _Decoded(torch.utils.data.Dataset):
    """Each file decoded once (reduced, as predict does): the model's view and the
    picture's perceptual hash (64 bits: the same for a resized or re-encoded copy)."""

    def __init__(self, paths: list[str], view, size: int, draft: int):
        self.paths, self.view, self.size, self.draft = paths, view, size, draft
        self.budget = max_pixels()  # the call's, taken along to the worker processes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import imagehash

        try:
            image = open_rgb(self.paths[i], draft=self.draft, budget=self.budget)
        except WingspanError as e:
            return (torch.zeros(3, self.size, self.size), torch.zeros(64, dtype=torch.bool),
                    skip_reason(e))
        bits = torch.from_numpy(imagehash.phash(image).hash.reshape(-1).copy())
        return self.view(image), bits, ""


def audit_backbones(config: AuditConfig) -> list[str]:
    """The backbones whose features the audit puts side by side: --backbone's names, or for
    auto AUDIT_BACKBONES (with a run or model as the weights: its own backbone)."""
    from wingspan.models.factory import choose_backbone

    if config.backbone != "auto":
        return [n.strip() for n in config.backbone.split(",")]
    if config.weights.lower() == "auto":
        return list(AUDIT_BACKBONES)
    return [choose_backbone("auto", config.weights)[0]]


def image_features(paths: list[str], config: AuditConfig, progress: bool
                   ) -> tuple[list[torch.Tensor], torch.Tensor, str, dict[str, str], str]:
    """Each backbone's pooled features of every path (`audit_backbones`; zeros for a file
    that cannot be read, listed with why), and perceptual hashes (N, 64 bits); the
    backbones' names, and what their features are (`features_source`)."""
    from wingspan.models.registry import get_spec
    from wingspan.models.runtime import forget_sessions

    names = audit_backbones(config)
    for name in names:  # a misspelt second name: said now, not after the first's pass
        get_spec(name)
    features, hashes, failed, what = [], [], {}, []
    for name in names:  # (each decodes at its own size, so that its cached features are
        # the same as an audit with it alone)
        try:
            x, bits, why, source = _features(paths, name, config, progress)
        finally:  # its ONNX Runtime session held 1 GB (Lite2, batch 32) beside the next's
            forget_sessions()
        features.append(x)
        hashes.append(bits)
        failed.update(why)
        what.append(source)
    # (the first's hashes, as its features: decoded at its size, as an audit with it alone)
    return features, hashes[0], " + ".join(names), failed, "; ".join(what)


@torch.inference_mode()
def _features(paths: list[str], name: str, config: AuditConfig, progress: bool
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, str], str]:
    """One frozen backbone's pooled features and the hashes of every path, the files that
    could not be read, and what the features are."""
    from wingspan.config import AugmentConfig
    from wingspan.data.transforms import eval_transform
    from wingspan.models import create_classifier, resolve_policy
    from wingspan.models.weights import weights_digest
    from wingspan.training.data import default_workers, room_for_workers

    model, loaded = create_classifier(name, {"label": 2}, config.weights)
    pre = model.preprocessing = _preprocessing(model, loaded)
    # Random weights (--weights none) differ on every call: nothing to keep. (The engine's
    # precision is not in the key: bf16 and fp32 features differ little, though enough to
    # move a near-tie of the ranking: 8 of 11 flipped labels in the test's top 5% in bf16
    # on an AMX Xeon, 9 in fp32.) The preprocessing is: a run trained
    # at 96 px and ImageNet's 224 px see other features in the same weights.
    # A pixel budget decodes large images otherwise: its features are its own.
    made = (f"{name}|{weights_digest(loaded.state_dict)}|{pre.input_size}|{pre.crop_pct}|"
            f"{pre.interpolation}|{pre.mean}|{pre.std}{budget_key(max_pixels())}"
            if config.cache and loaded else "")
    # Each image's features, then its 64 hash bits, in one array.
    cache = FileArrays(default_cache_dir() / "audit-features" /
                       hashlib.sha1(made.encode()).hexdigest()[:16] if made else None, made)
    entries = [_entry(cache, p) for p in paths]  # before reading: an edit mid-audit is redone
    kept = [_split(cache.get(e)) for e in entries]
    todo = [i for i, k in enumerate(kept) if k is None]
    failed: dict[str, str] = {}
    policy = resolve_policy(config.device)  # a wrong --device is said, cached or not
    if todo:
        policy.prepare_model(model)
        policy = policy.choose_frozen(model, pre.input_size, config.batch_size,
                                      progress=progress)
        extract = policy.runner(model.feature_extractor(), pre.input_size)
        view = eval_transform(AugmentConfig(image_size=pre.input_size, eval_crop=pre.crop_pct),
                              mean=pre.mean, std=pre.std, interpolation=pre.interpolation)
        images = _Decoded([paths[i] for i in todo], view, pre.input_size,
                          round(pre.input_size / pre.crop_pct))
        workers = room_for_workers(default_workers(), config.batch_size, pre.input_size)
        loader = torch.utils.data.DataLoader(images, batch_size=config.batch_size,
                                             num_workers=workers)
        done = iter(todo)
        title = f"Features ({name}; {len(paths) - len(todo)} kept from an earlier audit)"
        for x, bits, errors in track(loader, title, total=len(loader), enabled=progress):
            for feature, bit, error in zip(extract(x).float(), bits, errors, strict=True):
                i = next(done)
                if error:
                    failed[paths[i]] = error
                    kept[i] = (torch.zeros_like(feature), bit)
                else:
                    kept[i] = (feature, bit)
                    cache.put(entries[i], torch.cat([feature.cpu(), bit.float()]).numpy())
    return (torch.stack([k[0] for k in kept]), torch.stack([k[1] for k in kept]), failed,
            features_source(name, loaded))


def features_source(name: str, loaded: LoadedWeights | None) -> str:
    """What the audit's features are, for audit.html: ImageNet's only when the weights
    came from an ImageNet source (--weights auto)."""
    if loaded is None:
        return f"{name} (random weights, --weights none, frozen)"
    if loaded.source == "wingspan-model":
        return f"{name} (the fine-tuned backbone of {loaded.location}, frozen)"
    if loaded.source == "wingspan-checkpoint":
        return f"{name} (the backbone of the checkpoint {loaded.location}, frozen)"
    if loaded.source == "file":
        return f"{name} (weights file {loaded.location}, frozen)"
    return f"{name} (ImageNet, frozen)"


def _preprocessing(model: Classifier, loaded: LoadedWeights | None) -> Preprocessing:
    """How the features' backbone wants its images: a wingspan run's or model's own (its
    bundle's size, crop and normalisation, e.g. a run trained with --image-size 96), else
    the backbone's default for its ImageNet weights."""
    from wingspan.models.bundle import read_manifest
    from wingspan.models.classifier import Preprocessing

    if loaded is None or loaded.source != "wingspan-model":
        return model.preprocessing
    saved = read_manifest(loaded.location).get("preprocessing")
    return Preprocessing.from_dict(saved) if saved else model.preprocessing


def _split(saved: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A kept array as (features, hash bits)."""
    if saved is None:
        return None
    return torch.from_numpy(saved[:-64]).float(), torch.from_numpy(saved[-64:]).bool()


def _entry(cache: FileArrays, path: str) -> Path | None:
    try:
        return cache.entry(path)
    except OSError:  # gone: reading it says so
        return None


def label_issues(table: pd.DataFrame, features: torch.Tensor, level: str,
                 config: AuditConfig, progress: bool = False) -> pd.DataFrame:
    """Every image ranked by cleanlab's label quality (lowest first) from out-of-fold
    probabilities of a logistic head on the features."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import PredefinedSplit, StratifiedKFold

    from wingspan.data.split import stratified_group_folds

    classes = sorted(table[level].unique())
    y = table[level].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = fold_count(table[level], config)
    # On the unit-length features as they are: standardised per dimension (on the few
    # dozen images of a small set's fold) the head grew sure of everything, and a clean
    # image next to a few odd ones (CMYK, 16-bit noise) came out top, at p 1.0
    # (docs/performance.md).
    x = torch.nn.functional.normalize(features, dim=1).numpy()
    head = LogisticRegression(C=config.c, max_iter=2000)
    with warnings.catch_warnings():  # "least populated class has only 2 members": meant
        warnings.filterwarnings("ignore", message="The least populated class")
        # Photos of one specimen or observation (--group-regex) stay in one fold: its
        # other photos, in the training folds, would vouch for a wrong label of all.
        # (StratifiedGroupKFold's folds, as `data split` computes them: faster)
        groups = table[GROUP].astype(str).to_numpy()
        cv = (PredefinedSplit(stratified_group_folds(y, groups, min(folds, len(set(groups))),
                                                     config.seed))
              if len(set(groups)) < len(groups) else
              StratifiedKFold(folds, shuffle=True, random_state=config.seed))
        # cross_val_predict's loop, written out for a progress bar: a fold's head gives
        # the classes its training folds hold; one they lack gets probability 0.
        probs = np.zeros((len(y), len(classes)))
        for fit, held in track(cv.split(x, y), f"Scoring the labels of "
                               f"{counted(len(y), 'image')} out of fold (heads fitted)",
                               total=cv.get_n_splits(), enabled=progress):
            fold = clone(head).fit(x[fit], y[fit])
            probs[np.ix_(held, fold.classes_)] = fold.predict_proba(x[held])
    quality = get_label_quality_scores(y, probs)
    flagged = np.zeros(len(y), dtype=bool)
    flagged[find_label_issues(y, probs, return_indices_ranked_by="self_confidence")] = True
    suspected = probs.argmax(1)
    frame = pd.DataFrame({
        "path": table[PATH], "split": table[SPLIT].replace("", "-"), "label": table[level],
        "suspected": [classes[i] for i in suspected],
        "label_quality": quality, "suspected_probability": probs.max(1),
        "flagged": flagged})
    frame = frame.sort_values("label_quality", kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


def checker_scores(issues: pd.DataFrame, weak_below: float) -> dict:
    """How often the out-of-fold head names an image's given label (its accuracy), the
    mean of that over classes (balanced accuracy), and what guessing gives: the commonest
    class's share, and 1 / classes. `weak`: too low for the flags to mean wrong labels."""
    right = issues["suspected"] == issues["label"]
    shares = issues["label"].value_counts(normalize=True)
    accuracy = float(right.mean()) if len(right) else 0.0
    return {"accuracy": accuracy,
            "balanced_accuracy": float(right.groupby(issues["label"]).mean().mean()),
            "commonest_share": float(shares.max()), "classes": len(shares),
            "weak": accuracy < weak_below}


def checker_said(scores: dict) -> str:
    """The head's out-of-fold accuracy beside chance, in a line."""
    return (f"out-of-fold accuracy {scores['accuracy']:.2f} (chance "
            f"{scores['commonest_share']:.2g}, the commonest class's share), balanced "
            f"accuracy {scores['balanced_accuracy']:.2f} (chance {1 / scores['classes']:.2g}: "
            f"1 of {scores['classes']} classes)")


def weak_checker_said(scores: dict, level: str) -> str:
    """What a weak checker's flags mean, and what to do (the terminal's and the page's)."""
    return (f"the out-of-fold head names only {scores['accuracy']:.0%} of the labels at "
            f"level '{level}' right, too few for its flags to single out wrong labels: most "
            "flags say that the features do not tell these classes apart. Give the classes "
            "more images, audit with the features of a model trained on this data "
            "(--weights RUN), or audit a coarser --level.")


def near_duplicates(table: pd.DataFrame, features: torch.Tensor, hashes: torch.Tensor,
                    level: str, config: AuditConfig, cells: int = 1 << 24) -> pd.DataFrame:
    """Pairs of images whose perceptual hashes differ in at most `hash_distance` bits
    (a copy resized or re-encoded) or whose features' cosine similarity is at least
    `duplicate_similarity` (the same scene, e.g. a burst); a block of rows at a time, of
    about `cells` pairs (64 MB a matrix), so that memory stays flat as N grows (1024 rows
    a block held ~0.8 GB at ETHEC's 48k images, ~8 GB at 500k).

    Each image is listed with its `duplicates_per_image` closest partners (a pair stays
    if either image keeps it): n images of one look, pinned specimens on one background
    say, would otherwise list n (n - 1) / 2 pairs (4,950 for a species of 100). Every
    pair carries its group, the images linked by any chain of close pairs (scipy's
    connected components over all of them, capped or not), and the group's size."""
    x = torch.nn.functional.normalize(features.float(), dim=1)
    h = hashes.float()
    ones = h.sum(1)
    n, most = len(x), config.duplicates_per_image
    block = max(1, cells // max(n, 1))
    links, pending, kept = [], 0, {}
    for start in range(0, n, block):
        sims = x[start:start + block] @ x.T
        part = h[start:start + block]
        # Hamming distances: the bits set in either, less twice those set in both.
        bits = (part @ h.T).mul_(-2).add_(ones).add_(ones[start:start + block, None])
        close = (sims >= config.duplicate_similarity) | (bits <= config.hash_distance)
        own = torch.arange(len(part))
        close[own, own + start] = False  # not an image with itself
        rows, cols = torch.nonzero(close, as_tuple=True)
        links.append(np.stack([(rows + start).numpy(), cols.numpy()]))
        pending += len(rows)
        if pending > 2 * n:  # n alike images link n^2 pairs: kept as the groups they make
            links, pending = [_forest(_groups(links, n))], n
        # Each row's closest partners: the most similar first, then the fewest bits apart.
        rank = sims.masked_fill(~close, -2.0) - bits * 1e-3
        top = rank.topk(min(most, n), dim=1)
        r, k = torch.nonzero(top.values > -1.5, as_tuple=True)  # (-2: not close)
        c = top.indices[r, k]
        for a, b, sim, bit in zip((r + start).tolist(), c.tolist(), sims[r, c].tolist(),
                                  bits[r, c].tolist(), strict=True):
            kept[(min(a, b), max(a, b))] = (sim, int(bit))
    group = _groups(links, n)
    sizes = np.bincount(group, minlength=n)
    splits, labels, paths = table[SPLIT].tolist(), table[level].tolist(), table[PATH].tolist()
    frame = pd.DataFrame([{
        "path_a": paths[a], "path_b": paths[b], "split_a": splits[a] or "-",
        "split_b": splits[b] or "-", "label_a": labels[a], "label_b": labels[b],
        "similarity": s, "hash_distance": d, "across_splits": splits[a] != splits[b],
        "labels_differ": labels[a] != labels[b], "group": int(group[a]),
        "group_size": int(sizes[group[a]])} for (a, b), (s, d) in kept.items()],
        columns=["path_a", "path_b", "split_a", "split_b", "label_a", "label_b", "similarity",
                 "hash_distance", "across_splits", "labels_differ", "group", "group_size"])
    # Leaks and contradictory labels first, then the closest.
    return frame.sort_values(["across_splits", "labels_differ", "similarity"],
                             ascending=False).reset_index(drop=True)


def _groups(links: list[np.ndarray], n: int) -> np.ndarray:
    """Each of the n images' group: scipy's connected components over the pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate(links, axis=1) if links else np.zeros((2, 0), dtype=np.int64)
    return connected_components(coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])),
                                           shape=(n, n)), directed=False)[1]


def _forest(group: np.ndarray) -> np.ndarray:
    """Pairs that link the same groups as `group` says, at most one per image: each to its
    group's first image (the pairs of 16k alike images would fill 23 GB; these, 256 KB)."""
    _, first = np.unique(group, return_index=True)
    to = first[group]
    keep = to != np.arange(len(group))
    return np.stack([np.flatnonzero(keep), to[keep]])


def _split_shown(split: str, after: str = " · ") -> str:
    """A card's split and what follows it; nothing for data without splits, whose "-" read
    as a bullet."""
    return "" if split in ("", "-") else html.escape(split) + (after or " ")


def gallery(issues: pd.DataFrame, duplicates: pd.DataFrame, level: str, config: AuditConfig,
            features: str, failed: dict[str, str], alone: list[str] = ()) -> str:
    """audit.html: a self-contained page (thumbnails embedded) of the most suspect labels,
    then the near-duplicate pairs."""
    e = html.escape
    cards = []
    for r in issues.head(config.gallery).itertuples():
        cards.append(
            # (alt: what the card is, not its path, which the caption gives)
            f"<div class='c'><img alt='#{r.rank}, labelled {e(r.label)}' "
            f"src='{thumbnail_uri(r.path)}'>"
            f"<div>#{r.rank} labelled <b>{breakable(r.label)}</b></div>"
            # (which cards cleanlab flagged, in words, not by colour alone: the flags are
            # not the lowest qualities, and a card did not say whether it was one of them)
            + ("<div><b class='s'>flagged</b> by cleanlab</div>" if r.flagged else "")
            + (f"<div class='s'>looks like <b>{breakable(r.suspected)}</b> "
               f"({r.suspected_probability:.2f})</div>" if r.suspected != r.label else
               # (a low quality alone, its label still the likeliest: not called a mismatch)
               f"<div>its label is the likeliest ({r.suspected_probability:.2f})</div>")
            + f"<div class='m'>quality {e(rounded(r.label_quality, 3))} · {_split_shown(r.split)}"
            f"{breakable(r.path)}</div>"
            "</div>")
    pairs = []
    # One pair a group first (its first in the table's order: leaks and two labels lead),
    # so that one look-alike series does not fill the page; then the rest in order.
    first = ~duplicates.duplicated("group")
    shown = pd.concat([duplicates[first], duplicates[~first]]).head(config.gallery // 2)
    for r in shown.itertuples():
        pairs.append(
            "<div class='c pair'>"
            + (f"<div>group of {r.group_size} images</div>" if r.group_size > 2 else "")
            +
            f"<img alt='first of the pair, labelled {e(r.label_a)}' "
            f"src='{thumbnail_uri(r.path_a)}'>"
            f"<img alt='second of the pair, labelled {e(r.label_b)}' "
            f"src='{thumbnail_uri(r.path_b)}'>"
            f"<div>similarity {r.similarity:.3f}, hash distance {r.hash_distance}"
            + (" · <b class='s'>across splits</b>" if r.across_splits else "")
            + (" · <b class='s'>labels differ</b>" if r.labels_differ else "")
            + f"</div><div class='m'>{_split_shown(r.split_a, '')}{breakable(r.label_a)}: "
            f"{breakable(r.path_a)}<br>{_split_shown(r.split_b, '')}{breakable(r.label_b)}: "
            f"{breakable(r.path_b)}"
            "</div></div>")
    flagged = int(issues["flagged"].sum())
    scores = checker_scores(issues, config.weak_checker)
    body = (
        f"<h1>Label audit: {len(issues)} images, level '{e(level)}'</h1>"
        f"<p>Features: {e(features)}. Out-of-fold probabilities from a "
        f"{fold_count(issues['label'], config)}-fold logistic head; cleanlab flags "
        f"{flagged} images as likely mislabelled (those among the cards below say "
        "'flagged'). Below, the "
        f"{min(config.gallery, len(issues))} lowest label qualities (the label's "
        "out-of-fold probability): check these first.</p>"
        f"<p>How well the head checks: {e(checker_said(scores))}.</p>"
        + (f"<p class='s'><b>Too weak a check:</b> {e(weak_checker_said(scores, level))}</p>"
           if scores["weak"] else "")
        + (f"<p class='s'>Not checked: {counted(len(alone), 'class', 'classes')} with a "
           f"single image (or group), which no head could learn from its other images (a misspelt "
           f"class folder, say): {e(', '.join(alone))}.</p>" if alone else "")
        + f"<div class='g'>{''.join(cards)}</div>"
        f"<h2>Near-duplicates (perceptual hashes at most {config.hash_distance} bits apart, "
        f"or feature cosine similarity at least {config.duplicate_similarity}): "
        f"{counted(len(duplicates), 'pair')} in "
        f"{counted(duplicates['group'].nunique(), 'group')}, "
        f"{int(duplicates['across_splits'].sum())} across splits, "
        f"{int(duplicates['labels_differ'].sum())} with two labels (one pair a group first)"
        f"</h2><div class='g'>{''.join(pairs) or '<p>none</p>'}</div>"
        # (class m breaks a long path: on a phone one made the page scroll sideways; the
        # reader's message names the file already, mostly)
        + (f"<h2>Unreadable ({len(failed)})</h2><ul class='m'>"
           + "".join(f"<li>{e(w if p in w else f'{p}: {w}')}</li>" for p, w in failed.items())
           + "</ul>"
           if failed else ""))
    return cards_page("wingspan audit", body)
