"""`wingspan predict`: classes and probabilities for files, folders and globs."""

from __future__ import annotations

import bisect
import csv
import glob
import html
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wingspan.config import PREDICT_PAGE_IMAGES, TOP_K, usable_cores
from wingspan.data.readers import (
    images_under,
    is_file_manager_file,
    is_image_file,
    unsupported_photo,
)
from wingspan.errors import WingspanError, apart, counted, rounded
from wingspan.files import atomic_path, csv_on_stdout, remove_dead_leftovers, write_text
from wingspan.inference import Prediction, Predictor
from wingspan.models.unknown import UNKNOWN
from wingspan.parallel import (
    Processes,
    gather_to_main,
    interleave,
    lost_peer_said,
    peer_lost,
    shard,
)

if TYPE_CHECKING:
    import numpy as np

# What the unknown scores add to each prediction (see `answer_for`, `deciding_score`).
UNKNOWN_KEYS = ("answer", "known_level", "unknown_score", "threshold", "score_level")


def expand_paths(inputs: list[str], places: list[int] | None = None,
                 not_images: list[str] | None = None
                 ) -> tuple[list[str], list[tuple[str, str]]]:
    """Files as given, folders searched recursively for images, globs expanded.
    Returns the image paths and (input, reason) for inputs that match nothing. `places`
    gets where each of those belongs among the images (the number before it): an input
    that matches nothing keeps its place among the others, and a file skipped inside a
    folder (a HEIC photo) its place among the folder's sorted images. `not_images` gets
    the files a folder or a pattern holds that are not images (notes.txt, a raw photo's
    .xmp): left out, as training's reader leaves them, but counted."""
    found, missing, seen, searched = [], [], set(), set()

    def add(paths: list[str], search: bool = True) -> None:
        """Each image a folder or a glob finds once (`photos/**` matches a folder and the
        files in it too, and zsh's unquoted photos/**/* names both); a file named as
        such, as often as it is named (a row for each input), unless a search found it."""
        for path in paths:
            key = os.path.normpath(path)
            if key in (seen if search else searched):
                continue
            seen.add(key)
            if search:
                searched.add(key)
            found.append(path)

    def not_image(path: str) -> None:  # said once, however many inputs hold it
        if not_images is not None and (key := ("other", os.path.normpath(path))) not in seen:
            seen.add(key)
            not_images.append(path)

    def skip(entry: tuple[str, str], at: int) -> None:
        if (key := ("skipped", os.path.normpath(entry[0]))) in seen:  # said once
            return
        seen.add(key)
        missing.append(entry)
        if places is not None:
            places.append(at)

    def images_in(folder: str) -> list[str]:  # as training's reader finds them
        problems = []
        images = sorted(images_under(Path(folder), problems))
        # (a phone's HEIC photos in the folder, a subfolder it may not list, a link to
        # nothing or up the tree: skipped with the reason, not in silence)
        for p in problems:
            if p.kind in ("unsupported_photo", "unreadable_folder", "missing_file",
                          "link_not_followed"):
                skip((p.path, p.message), len(found) + bisect.bisect_left(images, p.path))
        for path in sorted(p.path for p in problems if p.kind == "not_image"):
            not_image(path)  # (sorted: os.walk's order differs by file system)
        return images

    for item in inputs:
        if not item.strip():  # an unset variable ("$PHOTOS"): Path('') is '.', searched whole
            skip((repr(item), "an empty path (an unset shell variable?); give the folder "
                  "as '.'"), len(found))
        elif any(c in item for c in "*?[") and not Path(item).exists():  # img[1].jpg: a file
            matches = sorted(glob.glob(item, recursive=True))
            matched = 0  # images the pattern matches, found before or not
            # A matched folder counts as a folder given (photos/*); of the files matched,
            # those a folder's search takes (not notes.txt, nor Thumbs.db).
            for match in matches:
                folder = Path(match).is_dir()
                images = (images_in(match) if folder else
                          [match] if is_image_file(match) else [])
                if not folder and (why := unsupported_photo(match)):
                    skip((match, why), len(found))
                elif not folder and not images and not is_file_manager_file(Path(match)):
                    not_image(match)
                matched += len(images)
                add(images)
            if not matched:
                # Not there as named either: photos/a[b].jpg is most likely a file's name.
                # A folder named with brackets ("2024 [garden]/*.jpg") matched nothing.
                literal = next((str(p) for p in Path(item).parents
                                if "[" in p.name and p.is_dir()), None)
                if literal and not glob.glob(glob.escape(literal) + item[len(literal):]):
                    literal = None  # escaped, it matches nothing either: a slip elsewhere
                skip((item, f"no match: '[' begins a pattern, so {literal} is not read as the "
                      f"folder of that name; give the folder itself, or write [[] for each "
                      f"'[' in it ({glob.escape(literal)}/...)" if literal and not matches else
                      "no such file or folder, nor any match as a pattern"
                      if not matches else "the pattern matches only folders without images"
                      if all(Path(m).is_dir() for m in matches) else
                      "the pattern matches no image file"), len(found))
        elif Path(item).is_dir():
            images = images_in(item)
            add(images)
            if not images and not any(Path(m[0]) == Path(item) for m in missing):  # (locked)
                skip((item, "the folder holds no images"), len(found))
        elif Path(item).is_file():
            if why := unsupported_photo(item):  # named as it is in a folder
                skip((item, why), len(found))
            else:
                add([item], search=False)
        else:
            skip((item, "no such file or folder"), len(found))
    return found, missing


def not_images_said(paths: list[str]) -> str:
    """'Left out 2 files that are not images (by their names' endings): a, b': predict's
    line for PredictResult.not_images, in the CLI and as the library's warning."""
    n, names = len(paths), [Path(p).name for p in paths]
    endings = "its name's ending" if n == 1 else "their names' endings"
    return (f"Left out {counted(n, 'file that is not an image', 'files that are not images')}"
            f" (by {endings}): {', '.join(names[:3])}"
            + (f" and {n - 3} more" if n > 3 else ""))


def taxonomy_path(taxonomy, fine_probs, temperature: float) -> list[tuple[str, str, float]]:
    """(level, class, probability) from the top of the tree down: a consistent branch,
    chosen as at temperature 1 (`Taxonomy.predict`), each class's probability the sum of
    its descendants' `fine_probs` (at `temperature`, the calibrated ones)."""
    marginals = taxonomy.marginals(fine_probs[None])
    chosen = taxonomy.predict(fine_probs[None], temperature=temperature)
    return [(lv, taxonomy.classes[lv][chosen[lv][0]], float(marginals[lv][0, chosen[lv][0]]))
            for lv in taxonomy.levels]


@dataclass
class PredictResult:
    rows: list[dict] = field(default_factory=list)  # one per readable image
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    images_per_second: float = 0.0
    # ("row", i) and ("failed", j) in the order the inputs were given: the CSV and the
    # library's table keep it (the JSON lists the failed apart, each with its path).
    order: list[tuple[str, int]] = field(default_factory=list)
    # The model's levels (with a taxonomy) and how many top classes each row has: the CSV's
    # columns, whatever rows could be read (a batch of broken files had other columns).
    levels: list[str] = field(default_factory=list)
    top_k: int = 1
    # Files the folders and patterns given hold that are not images: left out, not failed.
    not_images: list[str] = field(default_factory=list)
    level: str = ""  # the finest level's name (the model's one level, without a taxonomy)
    model: str = ""  # the bundle that predicted (the page says which)


def predict_fabric(device: str, devices: int | None, nodes: int | None, strategy: str,
                   workers: int | None):
    """The Fabric that shares a predict among processes (`--devices N`, or as torchrun
    started them), None for one process. Checks `workers` against the processes first:
    the others are started here."""
    from wingspan.training.data import resolve_workers

    processes = Processes(device, devices, nodes, strategy)
    per_machine, machines = processes.world()
    resolve_workers(workers, per_machine)  # before any other process starts
    return processes.fabric() if per_machine * machines > 1 else None


def predict(predictor: Predictor, inputs: list[str], top_k: int = TOP_K, tta: bool = False,
            progress: bool = True, fabric=None) -> PredictResult:
    """Predictions for every image the inputs name, in order. With a `fabric` of several
    processes each rank predicts every world_size-th image and every rank returns all the
    rows, in order, to rank 0 (the others return no rows)."""
    if top_k < 1:
        raise WingspanError(f"top_k must be at least 1, not {top_k}.",
                            hint="Ask for the top 1 (the answer alone) or more classes.")
    places: list[int] = []  # (number of images before it, (input, reason))
    not_images: list[str] = []
    paths, missing = expand_paths(inputs, places, not_images)
    unmatched = sorted(zip(places, missing, strict=True), key=lambda u: u[0])
    k = min(top_k, len(predictor.classes))
    result = PredictResult(levels=list(predictor.taxonomy.levels) if predictor.taxonomy else [],
                           top_k=k, not_images=not_images, level=predictor.level,
                           model=str(predictor.bundle))
    if fabric is not None and fabric.world_size > 1:
        mine = [paths[i] for i in shard(len(paths), fabric)]
        ours = list(predictor.run(mine, tta=tta, progress=progress and fabric.is_global_zero))
        try:
            gathered = gather_to_main(fabric, [(ours, predictor.images_per_second)])
        except RuntimeError as e:  # (~50 lines of gloo's traceback from each process)
            if not peer_lost(e):
                raise
            raise WingspanError(lost_peer_said(fabric, e),
                                hint="Predict again (the outputs were not written).") from e
        if gathered is None:  # not rank 0: it has done its share
            return result
        predictions: list[Prediction] = interleave([g[0][0] for g in gathered])
        predictor.images_per_second = sum(g[0][1] for g in gathered)
    else:
        predictions = predictor.run(paths, tta=tta, progress=progress)

    def unmatched_before(position: float) -> None:
        while unmatched and unmatched[0][0] <= position:
            result.order.append(("failed", len(result.failed)))
            result.failed.append(unmatched.pop(0)[1])

    for j, p in enumerate(predictions):
        unmatched_before(j)
        if p.error:
            result.order.append(("failed", len(result.failed)))
            result.failed.append((p.path, p.error))
            continue
        result.order.append(("row", len(result.rows)))
        order = p.probs.argsort()[::-1][:k]
        row = {"path": p.path, "top": [(predictor.classes[c], float(p.probs[c])) for c in order]}
        branch, level, said = answer_for(predictor, p.probs, p.known_level)
        if branch:
            row["taxonomy"] = branch
        # The model's prediction: a taxonomy's branch ends in it (chosen top-down, it may
        # be other than the top class by its own probability), else the top class.
        row["predicted"], row["probability"] = branch[-1][1:] if branch else row["top"][0]
        # (the class at the finest level the image is known at, else "unknown"; with the
        # score and the threshold it met)
        row.update(answer=said, known_level=level, **deciding_score(predictor, p.unknown))
        result.rows.append(row)
    unmatched_before(float("inf"))
    result.images_per_second = predictor.images_per_second
    return result


def others_header(result: PredictResult) -> str:
    """What a row's other classes are called: "next 2", or with a taxonomy "other 2
    species" ("other", not "next": the branch is chosen top-down, so one of them can be
    likelier alone than the branch's own class); "" with --top-k 1."""
    k = result.top_k
    return "" if k < 2 else f"other {k - 1} {result.level}" if result.levels else f"next {k - 1}"


def stopped_by_score(row: dict) -> bool:
    """Whether the unknown threshold stopped this answer above the finest level (not a
    --rare-below class, which is answered at its genus whatever its score)."""
    return row.get("unknown_score", 0.0) > row.get("threshold", float("inf"))


@dataclass
class RowWords:
    """A prediction in words, as the terminal's table and predictions.html show it."""
    answer: str  # the class answered, or "unknown"
    at_level: str  # " (genus)" where it is known at a coarser level only, else ""
    probability: str  # of the class answered, at its level; "-" for unknown
    detail: str  # the closest class and the score that stopped it; the branch; the others
    flagged: bool  # unknown, or known at a coarser level only


def row_words(row: dict, result: PredictResult) -> RowWords:
    """One row of `predict`'s result in words."""
    level, others = result.level, others_header(result)
    (best, p), rest = row["top"][0], row["top"][1:]
    if result.levels:  # the consistent branch is the prediction
        _, best, p = row["taxonomy"][-1]
        detail = " > ".join(f"{c} {rounded(q, 2)}" for _, c, q in row["taxonomy"])
        rest = [(c, q) for c, q in row["top"] if c != best][:result.top_k - 1]
        if rest:
            detail += f"; {others}: " + ", ".join(f"{c} {rounded(q, 2)}" for c, q in rest)
    else:
        detail = ", ".join(f"{c} {rounded(q, 2)}" for c, q in rest)
    # Unknown here, or known only at a coarser level: told by the level, not by the
    # answer's text (a class may be named "unknown").
    if row["known_level"] == level:
        return RowWords(best, "", f"{p:.3f}", detail, False)
    at = f" at {row['score_level']}" if result.levels else ""
    # (the closest class's own probability: it read "closest: Aglais io 0.418", its
    # subfamily's, where the branch beside it says "Aglais io 0.16")
    closest = f"closest: {best} {p:.3f}"
    if row["known_level"]:  # the probability of the class answered, at its level
        p = next(q for lv, _, q in row["taxonomy"] if lv == row["known_level"])
    if stopped_by_score(row):
        score, limit = apart(row["unknown_score"], row["threshold"])
        detail = f"{closest}; unknown score {score} > {limit}{at}; " + detail
    else:  # a --rare-below class: rare species the model learnt as their genus
        detail = f"closest: {best}, species not learnt apart; " + detail
    # "unknown 1.000" read as sure it is unknown: the closest class's probability goes
    # beside its name in the detail instead.
    return RowWords(row["answer"], f" ({row['known_level']})" if row["known_level"] else "",
                    "-" if row["known_level"] is None else f"{p:.3f}", detail, True)


def answer_at(known_level: str | None, branch: list[tuple[str, str, float]],
              top_class: str, finest: str) -> str:
    """The class at the level an image is known at (its branch's class there; the top
    class for a one-level model), or "unknown"."""
    if known_level is None:
        return UNKNOWN
    return dict((lv, c) for lv, c, _ in branch).get(known_level) or (
        top_class if known_level == finest else UNKNOWN)


def answered(predictor: Predictor, known_level: str | None,
             branch: list[tuple[str, str, float]], top_class: str) -> tuple[str | None, str]:
    """(the level the answer is given at, the answer): the level the unknown scores pass
    (`known_level`), or the one above when the branch ends in rare species that
    `--rare-below` merged into their genus, whose species the model cannot name."""
    if known_level == predictor.level and len(branch) > 1 and branch[-1][1] in predictor.merged:
        known_level = branch[-2][0]
    return known_level, answer_at(known_level, branch, top_class, predictor.level)


def answer_for(predictor: Predictor, probs: np.ndarray, known_level: str | None
               ) -> tuple[list[tuple[str, str, float]], str | None, str]:
    """(the taxonomy's branch, [] without one; the level the answer is given at; the answer)
    for an image's finest-level probabilities and the level its unknown scores pass: what
    predict, evaluate, explain and the server all answer."""
    branch = (taxonomy_path(predictor.taxonomy, probs, predictor.temperature)
              if predictor.taxonomy else [])
    return (branch, *answered(predictor, known_level, branch,
                              predictor.classes[int(probs.argmax())]))


def deciding_score(predictor: Predictor, scores: dict[str, float] | None) -> dict:
    """The unknown score that decided the answer, its threshold and its level: the first
    level, coarse to fine, over its threshold (the one that stopped the answer there),
    else the finest."""
    if not scores:
        return {}
    level = next((lv for lv in predictor.model.levels  # (NaN: over, as deepest_known has it)
                  if not scores[lv] <= predictor.thresholds[lv]), predictor.level)
    return {"unknown_score": scores[level], "threshold": predictor.thresholds[level],
            "score_level": level}


def table_path(path: str) -> str:
    """An image's path as the output tables write it: absolute, so that they join evaluate's
    and audit's. Not resolved: the data reader resolves a dataset's root alone, and keeps a
    linked class folder's name below it, as this keeps every name given."""
    return os.path.abspath(path)


def write_predictions(result: PredictResult, path: Path) -> None:
    """CSV (path, answer, predicted, probability, [<level>, <level>_prob, ...,] class_1,
    prob_1, ..., the unknown score's fields, error) or JSON, by the file's suffix; "-":
    the CSV on standard output. Paths are absolute, as evaluate's and audit's, so that the
    tables join whatever folder each command ran in."""
    if str(path) == "-":
        with csv_on_stdout() as f:
            _write_csv(result, f)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path)  # (a half-written table a SIGTERM left)
    if path.suffix.lower() == ".html":
        write_text(path, predictions_page(result, path))
        return
    if path.suffix.lower() == ".json":
        write_text(path, json.dumps({
            "predictions": [{"path": table_path(r["path"]), "answer": r["answer"],
                             "predicted": r["predicted"], "probability": r["probability"],
                             "top": [{"class": c, "probability": p} for c, p in r["top"]],
                             **({"branch": [{"level": lv, "class": c, "probability": p}
                                            for lv, c, p in r["taxonomy"]]}
                                if "taxonomy" in r else {}),
                             **{key: r[key] for key in UNKNOWN_KEYS if key in r}}
                            for r in result.rows],
            "failed": [{"path": table_path(f), "error": e} for f, e in result.failed],
            "not_images": [table_path(p) for p in result.not_images]}, indent=2))
        return
    # (a file name that is not UTF-8, b'caf\xe9.jpg', is written 'caf\udce9.jpg': it
    # stopped the CSV, and every prediction was lost)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                        errors="backslashreplace") as f:
        _write_csv(result, f)


def predictions_page(result: PredictResult, path: Path) -> str:
    """predictions.html: a card per image (its thumbnail, the answer, the closest class and
    the others), the least sure first, where a person looking through them begins; above
    them, how many images each answer got. The first PREDICT_PAGE_IMAGES images alone, so
    that a page of thousands still opens (the CSV or JSON keeps them all, in order)."""
    from wingspan.pages import breakable, cards_page, href, thumbnail_uri

    e = html.escape
    words = [(row, row_words(row, result)) for row in result.rows]
    levels = result.levels or [result.level]

    def least_sure_first(rw: tuple[dict, RowWords]) -> tuple[int, float]:
        # Unknown first, then the coarsest answers (a family before a genus), each by the
        # probability its card shows: a coarser answer's at its level (by its species',
        # which the card does not show, a family at 0.46 came after a subfamily at 0.42).
        row, level = rw[0], rw[0]["known_level"]
        if level is None:
            return -1, row["probability"]
        at_level = {lv: q for lv, _, q in row.get("taxonomy", [])}
        return levels.index(level), at_level.get(level, row["probability"])

    words.sort(key=least_sure_first)
    shown = words[:PREDICT_PAGE_IMAGES]
    # (Pillow decodes outside the GIL: a 12 MP photo's thumbnail takes 25-100 ms, a
    # thousand of them a minute or more on one core)
    with ThreadPoolExecutor(usable_cores()) as pool:
        thumbnails = list(pool.map(thumbnail_uri, [row["path"] for row, _ in shown]))
    cards = []
    for (row, said), thumbnail in zip(shown, thumbnails, strict=True):
        answer = f"{said.answer}{said.at_level}"
        probability = "" if said.probability == "-" else f" {e(said.probability)}"
        bold = "<b class='s'>" if said.flagged else "<b>"  # (and said in words)
        # (the thumbnail opens the photo itself; the path as it was given)
        cards.append(
            f"<div class='c'><a href='{href(Path(row['path']), path.parent)}'><img "
            f"alt='{e(Path(row['path']).name)}, answered {e(answer)}' "
            f"src='{thumbnail}'></a>"
            f"<div>{bold}{breakable(said.answer)}</b>{e(said.at_level)}{probability}</div>"
            + (f"<div class='m'>{breakable(said.detail)}</div>" if said.detail else "")
            + f"<div class='m'>{breakable(row['path'])}</div></div>")
    answers = Counter(f"{w.answer}{w.at_level}" for _, w in words)
    counts = "".join(f"<tr><td>{e(a)}</td><td>{n}</td></tr>" for a, n in answers.most_common())
    intro = (f"The {PREDICT_PAGE_IMAGES} least sure of the {len(words)} images, the least "
             "sure first" if len(words) > PREDICT_PAGE_IMAGES else "The least sure first")
    body = (
        f"<h1>Predictions: {counted(len(words), 'image')}</h1>"
        f"<p>By the model {breakable(result.model)}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>"
        f"<p>{intro}: the images answered unknown (unlike every class the model knows), then "
        "those known at a coarser level only (the coarsest first), each by the probability "
        "of the class answered. A CSV or JSON (<code>--output preds.csv</code>) keeps every "
        "image in the order given.</p>"
        + (f"<h2>Answers</h2><table><tr><th scope='col'>answer</th><th scope='col'>images"
           f"</th></tr>{counts}</table>" if words else "")
        + f"<h2>Images</h2><div class='g'>{''.join(cards) or '<p>none</p>'}</div>"
        + (f"<h2>Skipped ({len(result.failed)})</h2><ul class='m'>"
           # (the reason without its path again, as the terminal's "skipped" line has it)
           + "".join(f"<li>{breakable(p)}: "
                     f"{e(why.removeprefix(f'Cannot read image {p}: '))}</li>"
                     for p, why in result.failed) + "</ul>" if result.failed else ""))
    return cards_page(f"wingspan predictions: {path.stem}", body)


def _write_csv(result: PredictResult, f) -> None:
    k, levels = result.top_k, result.levels
    # The answer and the prediction first (with a taxonomy, its branch: one class and its
    # probability per level, coarse to fine, as the table shows them), then the top
    # classes. Lines end in "\n", as evaluate's CSVs do (csv's "\r\n" left a "\r" on the
    # error column for awk and cut).
    writer = csv.writer(f, lineterminator="\n")
    details = [key for key in UNKNOWN_KEYS if key != "answer"]
    header = ["path", "answer", "predicted", "probability",
              *[x for lv in levels for x in (lv, f"{lv}_prob")],
              *[x for i in range(1, k + 1) for x in (f"class_{i}", f"prob_{i}")],
              *details, "error"]
    writer.writerow(header)
    for kind, i in result.order:
        if kind == "failed":
            f_, e = result.failed[i]
            writer.writerow([table_path(f_), *[""] * (len(header) - 2), e])
            continue
        r = result.rows[i]
        writer.writerow([table_path(r["path"]), r["answer"], r["predicted"],
                         f"{r['probability']:.6f}",
                         *[x for _, c, p in r.get("taxonomy", []) for x in (c, f"{p:.6f}")],
                         *[x for c, p in r["top"] for x in (c, f"{p:.6f}")],
                         *[_cell(r.get(key)) for key in details], ""])


def _cell(value) -> str:
    # (9 digits: a score just over its threshold must not read as equal to it)
    return "" if value is None else f"{value:.9g}" if isinstance(value, float) else str(value)
