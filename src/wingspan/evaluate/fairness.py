"""Are an evaluation's figures fair? Whether its images (or copies of them) are ones the
run trained or chose on, `wingspan adapt` refitted on, or a temperature was fitted on."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pandas as pd

from wingspan.config import ReadConfig
from wingspan.data import read_dataset
from wingspan.data.samples import GROUP, SPLIT, Dataset, groups_given
from wingspan.errors import WingspanError, command, counted
from wingspan.files import disk_spelling, real_paths
from wingspan.training.folder import SEEN_SUMS_FILE, SPLITS_FILE, adapted_sums, trained_on


def calibration_data(split: str, data) -> str:
    """What a temperature was fitted on, as the bundle records it: "val" (training's), or
    the split of the data `wingspan calibrate` was given."""
    if isinstance(data, Dataset):
        data = data.root
    return f"{split} of {Path(data).resolve()}" if data is not None else split


def among_evaluated(fitted_on: str | None, evaluated: str) -> bool:
    """Whether the images a temperature was fitted on are among those evaluated (both as
    `calibration_data` writes them): the same split of the same data, or all of it on
    either side (fitted on all of DATA and evaluated on its test split, say)."""
    if not fitted_on:
        return False
    fitted_split, _, fitted_data = fitted_on.partition(" of ")
    split, _, data = evaluated.partition(" of ")
    return fitted_data == data and (fitted_split == split or "all" in (fitted_split, split))


def own_splits(dataset: Dataset, data, run_dir: Path | None) -> pd.DataFrame | None:
    """The run's images and their splits (its splits.csv), None for a bundle on its own."""
    if data is None:
        return dataset.table
    if run_dir is None or not (run_dir / SPLITS_FILE).is_file():
        return None
    try:  # the paths are matched, not opened: the run's images may be gone since
        return read_dataset(run_dir / SPLITS_FILE, ReadConfig(check_files=False)).table
    except WingspanError:  # an unreadable splits.csv: not this evaluation's concern
        return None


def _seen_by_source_run(manifest: dict, evaluated: set[str]) -> int:
    """How many of the `evaluated` (real paths) the run whose weights this one started from
    (`--weights RUN`, and the run it started from, and so on) trained or chose on: a new
    run split its data afresh and put 17 of the first run's training images in its test
    split, which evaluate called never seen."""
    seen: set[str] = set()
    source, runs = (manifest.get("training") or {}).get("started_from"), set()
    while source and source not in runs and (Path(source) / SPLITS_FILE).is_file():
        runs.add(source)
        try:
            table = read_dataset(Path(source) / SPLITS_FILE, ReadConfig(check_files=False)).table
        except WingspanError:  # (not this evaluation's concern: as own_splits)
            break
        seen.update(real_paths(table.loc[table[SPLIT].isin(["train", "val"]), "path"]))
        source = _started_from(Path(source))
    return len(evaluated & seen)


def _started_from(run_dir: Path) -> str | None:
    """The run a run's weights came from, as its bundle records it."""
    from wingspan.models.bundle import read_manifest

    try:
        return (read_manifest(run_dir / "model").get("training") or {}).get("started_from")
    except (WingspanError, OSError):
        return None


def comparable_groups(groups: pd.Series, dataset: Dataset, data, run_dir: Path | None
                       ) -> list[str] | None:
    """The evaluated images' groups (an ETHEC specimen's barcode, an observation) where they
    mean what the run's splits.csv means by them: DATA is the data the run was trained on
    (a group key of other data, a number a regex found, may name something else)."""
    source = trained_on(run_dir) if run_dir is not None and data is not None else None
    if source is None or Path(source).resolve() != Path(dataset.root).resolve():
        return None
    return groups.tolist()


def copies_of_own(evaluated: set[str], seen: dict[str, str], own_root: str | None,
                   data_root: Path | None,
                   recorded: dict[str, dict[int, set[str]]] | None = None) -> dict[str, int]:
    """How many of the `evaluated` files (real paths) that are not the run's own are its
    train or val images (`seen`: real path -> side) copied or moved: the same path below
    the data's root as one of them below the run's data root, with the same bytes (a copy),
    or with the run's file gone when at least half of its files are matched so (the data
    moved, not a name or two reused: new photos may be IMG_0001.jpg too); and, under any
    other name or class folder (`--map`'s data renames them), the same bytes as one: as
    the run recorded them (`recorded`, seen_sums) where it did, else as its files are now."""
    from wingspan.data.leaks import content_hashes

    found = dict.fromkeys(("train", "val", *seen.values()), 0)  # (calibrate asks of test)
    others = sorted(evaluated - seen.keys())

    def by_bytes(paths: list[str]) -> dict[str, int]:
        return copies_by_bytes(set(paths), recorded) if recorded else same_bytes(paths, seen)

    if own_root is None or data_root is None:
        renamed = by_bytes(others)
        return {side: found[side] + renamed.get(side, 0) for side in found}
    own_root, data_root = (os.path.realpath(_folder_of(r)) for r in (own_root, data_root))
    mine = {os.path.relpath(p, own_root): (p, side) for p, side in seen.items()
            if p.startswith(own_root + os.sep)}
    pairs = [(e, *mine[key]) for e in sorted(evaluated - seen.keys())
             if e.startswith(data_root + os.sep)
             and (key := os.path.relpath(e, data_root)) in mine]
    moved = dict.fromkeys(found, 0)
    # (the keys are in NFC: a name copied from macOS is opened as the disk spells it)
    disk = dict(zip(keys := [p for pair in pairs for p in pair[:2]], disk_spelling(keys),
                    strict=True))
    for path, original, side in ((disk[e], disk[o], side) for e, o, side in pairs):
        if not os.path.exists(original):
            moved[side] += 1
            continue
        with contextlib.suppress(OSError):  # (a file unreadable now is no copy)
            if os.path.getsize(original) == os.path.getsize(path):  # only then read both
                a, b = content_hashes([original, path])
                found[side] += bool(a) and a == b
    if 2 * sum(moved.values()) >= len(mine):
        found = {side: found[side] + moved[side] for side in found}
    # (a copy matched by its path above is not counted again by its bytes)
    by_path = {e for e, *_ in pairs}
    renamed = by_bytes([e for e in others if e not in by_path])
    return {side: found[side] + renamed.get(side, 0) for side in found}


def _gone(seen: dict[str, str]) -> int:
    """How many of the run's train and val images are not where its splits.csv says: all
    (the run folder copied to another machine), or some (a class folder renamed since, an
    image moved), whose copies cannot be looked for. (A first 50 alone were looked at: a
    renamed class's 34 images the run had seen, then evaluated under its new name with
    --map, were called "nor a byte-for-byte copy of one".)"""
    return sum(not os.path.exists(p) for p in disk_spelling(list(seen)))


def same_bytes(evaluated: list[str], seen: dict[str, str]) -> dict[str, int]:
    """How many of `evaluated` (real paths) hold the same bytes as a file of `seen` (real
    path -> side), by side: sizes first, so only files of an evaluated file's size are
    read. Hand-written, as nothing else matches a copy whatever its name (the audit's
    perceptual hash finds re-saved ones too, at a pass of the backbone)."""
    from wingspan.data.leaks import content_hashes

    def sizes(paths: list[str]) -> dict[str, tuple[str, int]]:  # key -> (as spelt, size)
        out = {}
        for key, path in zip(paths, disk_spelling(paths), strict=True):
            with contextlib.suppress(OSError):
                out[key] = (path, os.path.getsize(path))
        return out

    mine = sizes(evaluated)
    wanted = {size for _, size in mine.values()}
    theirs = {k: v for k, v in sizes(sorted(seen)).items() if v[1] in wanted} if wanted else {}
    if not theirs:
        return {}
    kept = {size for _, size in theirs.values()}
    mine = {k: v for k, v in mine.items() if v[1] in kept}
    side_of = {}
    for key, digest in zip(theirs, content_hashes([p for p, _ in theirs.values()]),
                           strict=True):
        if digest:
            side_of.setdefault(digest, seen[key])
    found: dict[str, int] = {}
    for digest in content_hashes([p for p, _ in mine.values()]):
        if digest in side_of:
            found[side_of[digest]] = found.get(side_of[digest], 0) + 1
    return found


def copies_among(paths: set[str], sums: dict[int, set[str]], digits: int = 64) -> int:
    """How many of `paths` hold the same bytes as a photo `wingspan adapt` refitted on, or
    `calibrate` fitted on (`sums`: size -> the sha256 of the photos of that size, the first
    `digits` of it): sizes first, so only files of a photo's size are read."""
    from wingspan.data.leaks import content_hashes

    if not sums:  # a run not adapted (or adapted before the sums were kept): nothing to read
        return 0
    sizes = {}
    for path in disk_spelling(sorted(paths)):  # (real_paths' NFC keys, opened as spelt)
        with contextlib.suppress(OSError):
            if (size := os.path.getsize(path)) in sums:
                sizes[path] = size
    return sum(h[:digits] in sums[size] for size, h in zip(
        sizes.values(), content_hashes(list(sizes)), strict=True))


def sums_by_size(paths, sizes: set[int]) -> dict[int, set[str]]:
    """{size: the sha256 of those of `paths` of that size}, reading only the files whose
    size is among `sizes` (those of the files they are compared with)."""
    from wingspan.data.leaks import content_hashes

    wanted = {}
    for path in disk_spelling(sorted(set(map(str, paths)))):
        with contextlib.suppress(OSError):
            if (size := os.path.getsize(path)) in sizes:
                wanted[path] = size
    sums: dict[int, set[str]] = {}
    for size, digest in zip(wanted.values(), content_hashes(list(wanted)), strict=True):
        if digest:
            sums.setdefault(size, set()).add(digest)
    return sums


# A calibration's photos, kept in the bundle by size and the start of their sha256 (16 hex
# digits: 20 KB in manifest.json for 1,000 photos; a chance match is 1 in 2^64).
PHOTO_SUM_DIGITS = 16


def photo_sums(paths: list[str]) -> dict[str, list[str]]:
    """{size: [sha256 prefix, ...]} of the files (JSON keys are strings)."""
    from wingspan.data.leaks import content_hashes

    sums: dict[str, set[str]] = {}
    for path, digest in zip(paths, content_hashes(paths), strict=True):
        with contextlib.suppress(OSError):
            if digest:
                sums.setdefault(str(os.path.getsize(path)), set()).add(
                    digest[:PHOTO_SUM_DIGITS])
    return {size: sorted(hashes) for size, hashes in sorted(sums.items())}


def seen_sums(run_dir: Path | None) -> dict[str, dict[int, set[str]]] | None:
    """{side: {size: sha256 prefixes}} of the run's train and val images as it trained on
    them (SEEN_SUMS_FILE); None for a run trained before they were kept, or unreadable."""
    try:
        kept = json.loads((run_dir / SEEN_SUMS_FILE).read_text(encoding="utf-8"))
        return {side: {int(size): set(hashes) for size, hashes in kept[side].items()}
                for side in ("train", "val")}
    except (OSError, TypeError, ValueError, KeyError, AttributeError):
        return None


def copies_by_bytes(paths: set[str], recorded: dict[str, dict[int, set[str]]]
                    ) -> dict[str, int]:
    """How many of `paths` hold the bytes of a train or val image of the run, by side."""
    return {side: copies_among(paths, sums, digits=PHOTO_SUM_DIGITS)
            for side, sums in recorded.items()}


def _folder_of(root: str | Path) -> Path:
    """The folder a dataset's paths are below: a CSV's own folder (its paths are relative
    to it), else the root itself."""
    root = Path(root)
    return root.parent if root.suffix.lower() in (".csv", ".tsv", ".txt") else root


def fairness_verdict(manifest: dict, split: str, data, paths: list[str],
              own: pd.DataFrame | None, adapted: list[str] = (),
              run_dir: Path | None = None, groups: list[str] | None = None,
              data_root: Path | None = None) -> str:
    """Whether this evaluation's figures are unbiased: none of the images evaluated
    (`paths`) is one the run trained on (its train split) or chose its best epoch on (val),
    as its splits.csv (`own`, None without one) names them, whatever data or split they
    came from, nor one that `wingspan adapt` refitted its head on (`adapted`, real paths),
    nor (`groups`, on the run's own data) another photo of a specimen or observation it
    trained or chose on."""
    evaluated = set(real_paths(paths))
    copies = copies_among(evaluated.difference(adapted), adapted_sums(run_dir))
    among = len(evaluated.intersection(adapted)) + copies
    adapted_on = among or (data is None and split == "test" and manifest.get(
        "training", {}).get("adapted", {}).get("test_images_among_photos"))
    if adapted_on:  # (before the list was kept, the count of the run's own test images)
        return (f"no: `wingspan adapt` refitted this model on {adapted_on} of these "
                + (f"{len(evaluated)} " if among else "") + "images (as unlabelled photos"
                + (f"; {copies} of them as copies in another place" if copies else "") + "), "
                "so these figures are optimistic: evaluate it on photos that were not given "
                "to adapt")
    if own is None:  # (a model bundle copied without its run folder: no splits.csv)
        return ("unknown: this model came without its run folder, whose splits.csv says "
                "which images it was trained or chosen on; the figures are fair only if this "
                "data holds none of them")
    seen = own[own[SPLIT].isin(["train", "val"])]
    seen = dict(zip(real_paths(seen["path"]), seen[SPLIT], strict=True))
    trained, chosen = (sum(seen.get(p) == side for p in evaluated) for side in ("train", "val"))
    recorded = seen_sums(run_dir) if run_dir is not None else None
    # On the run's own data, a file of its split holding the bytes of an image it trained
    # on (two files swapped by a re-export) counts too, where the bytes were recorded
    copies = (copies_of_own(evaluated, seen, trained_on(run_dir) if run_dir else None,
                            data_root, recorded) if data is not None else
              copies_by_bytes(evaluated - seen.keys(), recorded) if recorded else
              {"train": 0, "val": 0})
    trained, chosen = trained + copies["train"], chosen + copies["val"]
    copied = ("" if not copies["train"] + copies["val"] else
              f" ({counted(copies['train'] + copies['val'], 'copy', 'copies')} of its files "
              "in another folder, or moved there)" if data is not None else
              f" ({counted(copies['train'] + copies['val'], 'file')} of this split with the "
              "bytes of one it trained or chose on: changed since)")
    groups_seen = set(own.loc[own[SPLIT].isin(["train", "val"]), GROUP]) if groups else set()
    if not trained and not chosen and (shared := sum(g in groups_seen for g in groups or [])):
        return (f"no: {shared} of these {len(evaluated)} images show a specimen or "
                "observation (the same group) that the run trained or chose its best epoch "
                "on in another photo, so these figures are optimistic; the run's own test "
                f"split keeps groups apart (`{command('evaluate', run_dir or 'RUN')}`, or "
                "run.evaluate() in Python)")
    if not trained and not chosen and (
            inherited := _seen_by_source_run(manifest, evaluated)):  # (after its own: the
        # run's own verdict, and its hint, come first)
        source = manifest["training"]["started_from"]
        return (f"no: this run started from the weights of {source} (--weights), which was "
                f"trained or chose its best epoch on {inherited} of these "
                f"{len(evaluated)} images, so these figures are optimistic: evaluate it on "
                "images neither run saw")
    if not trained and not chosen:
        return ("yes: the test split was never trained or chosen on" + (
                "" if own.empty or groups_given(own) else
                " (each photo its own group: none were given, so if several photos show one "
                "specimen or observation, some may sit on both sides; `"
                + command("data", "audit", f"{run_dir or 'RUN'}/splits.csv")
                + "` lists near-duplicates across them)")
                if data is None else
                "yes, as far as can be told: none of these files is one the run trained or "
                "chose its best epoch on; its own images are not where its splits.csv says, "
                "so copies of them under other names could not be looked for"
                if not recorded and (gone := _gone(seen)) and gone == len(seen) else
                "yes, as far as can be told: none of these files is one the run trained or "
                "chose its best epoch on, nor a byte-for-byte copy of one still in place; "
                f"{gone} of the run's own train and val images "
                f"{'is' if gone == 1 else 'are'} not where its splits.csv says (moved or "
                "renamed since it trained), so copies of those could not be looked "
                "for (and a copy re-saved, resized or edited would not be seen: `"
                + command("data", "audit", "DATA") + "` lists near-duplicates)"
                if not recorded and gone else
                "yes: none of these files is one the run trained or chose its best epoch on, "
                "nor a byte-for-byte copy of one, whatever its name (a copy re-saved, resized "
                "or edited would not be seen: `" + command("data", "audit", "DATA") + "` lists "
                "near-duplicates)")
    # (those still there: "the run's 29 test images" where 4 were deleted since)
    tests = sum(map(os.path.exists, disk_spelling(own.loc[own[SPLIT] == "test", "path"]
                                                   .tolist())))
    fair = (f"; for a fair figure evaluate the run's {counted(tests, 'test image')}, never "
            "trained or chosen on (`" + command("evaluate", run_dir or "RUN", "--split", "test")
            + "`, or run.evaluate(split=\"test\") in Python)"
            if tests and not (data is None and split == "test") else "")  # (not itself)
    if not trained:
        return (f"no: the best epoch was chosen on val ({chosen} of these images{copied}), "
                "so these figures are optimistic" + fair)
    n = len(evaluated)  # files: one named twice is one
    share = ("this image" if trained == n == 1 else f"all {trained} of these images"
             if trained == n else f"{trained} of these {n} images")
    return (f"no: the model was trained on {share}"
            + (f" and chose its best epoch on {chosen}" if chosen else "") + copied
            + ", so these figures are optimistic: they show how well it fits the images it "
            "learnt from, not how well it does on new ones" + fair)
