"""What an evaluation says in words: the report's rows and the sentences that the
terminal and the library print alike."""

from __future__ import annotations

import dataclasses
import shlex

import pandas as pd

from wingspan.config import NOT_LEARNT, TrainConfig, setting_text
from wingspan.errors import counted, some


def fairness(fair: str) -> tuple[str, str]:
    """("yes" | "no" | "unknown", why) of an evaluation's `fair` sentence, as
    `fairness_verdict` words it ("no: these images..."). Read here alone, so that the
    verdict's words can change without its readers."""
    verdict, _, why = str(fair).partition(": ")
    return verdict, why


def tree_wording(metrics: dict) -> str | None:
    """What evaluate says when DATA's taxonomy places classes otherwise than the model's
    tree (see `_moved_classes`), or None."""
    moved = metrics.get("tree_differs") or []
    if not moved:
        return None
    return (f"The data's taxonomy places {counted(len(moved), 'class', 'classes')} otherwise "
            f"than the model's tree (e.g. {moved[0]}): the coarser levels are scored against "
            "the data's, where an answer right at the finest level can count as wrong")


def tta_note(has_thresholds: bool) -> str:
    """What TTA does to the fitted figures: the temperature (and the unknown thresholds)
    are fitted on one view of each image (training, `wingspan calibrate`), while TTA
    scores the mean of the views, which is softer; refitting them on TTA would need
    TTA-specific values in the bundle, so the evaluation measures and says it instead."""
    fitted = "the temperature and the unknown thresholds were" if has_thresholds else \
        "the temperature was"
    return (f"{fitted} fitted on single views of the images, not on the mean of the views "
            "that TTA scores: the ECE after the temperature"
            + (" and the share of images turned away are" if has_thresholds else " is")
            + " as measured here, not as fitted")


def epochs_run(training: dict, train_metrics: dict) -> str:
    """The epochs each stage ran, and where that is not what was asked (stopped early)."""
    ran = train_metrics.get("epochs", {})
    parts = []
    for stage, asked in (("head", training.get("epochs_head")),
                         ("finetune", training.get("epochs_finetune"))):
        done = ran.get(stage, asked)
        parts.append(f"{done}" + (f" (of {asked}: stopped early)" if asked is not None
                                  and done is not None and done < asked else ""))
    return " + ".join(parts)


# Settings the overview has rows of, which a run records resolved (level None: the
# finest; backbone auto: the one chosen), so they differ from the default in every run.
IN_OVERVIEW = ("level", "levels", "backbone", "weights")


def recipe_wording(training: dict) -> str:
    """The settings a run was trained with that are not TrainConfig's defaults, in its
    order ("lr 0.01, label_smoothing 0.0"), or "the defaults": what tells two runs' reports
    apart. From the bundle's manifest, which a model folder copied alone keeps too."""
    changed = [f"{f.name} {setting_text(training[f.name])}" for f in dataclasses.fields(TrainConfig)
               if f.name in training and f.name not in (*NOT_LEARNT, *IN_OVERVIEW)
               and training[f.name] != f.default]
    return ", ".join(changed) or "the defaults"


def kept_rows(train_metrics: dict) -> list[tuple[str, str]]:
    """Which epoch the model is, and its val figure, which is optimistic (chosen on)."""
    best = train_metrics.get("best") or {}
    if not best:
        return []
    stage = {"head": "head", "finetune": "fine-tuning"}.get(best.get("stage"), best.get("stage"))
    f1 = best.get("val_macro_f1")
    return [("model kept", f"{stage} epoch {best.get('epoch')}, the best on val"),
            ("its val macro-F1 (optimistic: the epoch was chosen on it; over the classes "
             "val holds)",
             "-" if f1 is None else f"{f1:.4f}")]


# An AUROC below 0.5 is no weak score but one that ranks these unseen images as the more
# known (energy on noise does: its logits are large), read as "weak" where unmarked.
INVERTED = " (inverted: ranks these unseen images as the more known)"


def absent_rows(absent: list[str] | None, answered: int = 0, images: int = 0,
                answered_only: list[str] | None = None) -> list[tuple[str, str]]:
    """The model's classes left out of the per-class table and the macro averages, and
    the images answered with them; and those without images here that are in them, having
    been answered (`answered_only`); as (label, value) rows for the report (none when
    every class has images)."""
    rows = [("the model's classes without images here (left out of the per-class table "
             "and the macro averages)", f"{len(absent)}: {some(absent, 8)}"),
            *([("images answered with one of them (wrong: counted in recall, in no "
                "averaged class's precision)", f"{answered} ({answered / images:.1%})")]
              if answered and images else [])] if absent else []
    if answered_only:
        rows.append((ANSWERED_ONLY, f"{len(answered_only)}: {some(answered_only, 8)}"))
    return rows


ANSWERED_ONLY = ("the model's classes without images here but answered (in the per-class "
                 "table and the macro averages, each with F1 0)")


def answer_rows(a: dict | None) -> list[tuple[str, str]]:
    """The `answers` figures as (label, value) rows, for the report and the CLI."""
    if not a:
        return []

    def accuracy(f: dict) -> str:
        if f["accuracy_when_named"] is None:
            return "-"
        return f"{f['accuracy_when_named']:.4f}" + (
            f" ({f['right_when_named']} of {f['images_named']})" if "images_named" in f else "")

    rest = "a coarser level or unknown" if a.get("by_level") else "unknown"
    return [(f"named a class (the rest answered {rest}; '{a['score']}' at "
             f"{a['rate']:.0%})", f"{a['named']:.1%}"),
            ("accuracy when a class is named", accuracy(a)),
            ("named a wrong class", f"{a['named_wrongly']:.1%}"),
            *((f"named at {lv} or finer (accuracy there)", f"{f['named']:.1%} ({accuracy(f)})")
              for lv, f in list(a.get("by_level", {}).items())[:-1]  # the finest is above
              if f["named"] is not None)]  # (no image the data gives a class at lv)


LOOK_ALIKES_SHOWN = 20  # pairs a hint spells out (every folder capitalised: all of them)


def look_alike_hint(alike: dict[str, str], python: bool | None = False) -> str:
    """How to pair data classes with the model's that differ from them only in case,
    spacing, width or invisible marks ({data class: model class}), or "" for none: as --map
    (`python` False), as class_map= (True) or both (None, for an error either may meet)."""
    from wingspan.data.readers import how_names_differ, visible

    if not alike:
        return ""
    differ = max((how_names_differ([a, b]) for a, b in alike.items()), key=len)  # the widest
    pairs = list(alike.items())[:LOOK_ALIKES_SHOWN]
    more = (f" (and {len(alike) - len(pairs)} more alike)" if len(alike) > len(pairs) else "")
    in_python = "class_map={" + ", ".join(f"{ours!r}: {theirs!r}" for theirs, ours in pairs) + "}"
    # --map splits its value at commas and equals signs: a name holding one cannot be given
    typable = not any(c in name for pair in pairs for name in pair for c in ",=")
    on_the_line = f"--map {shlex.quote(','.join(f'{ours}={theirs}' for theirs, ours in pairs))}"
    how = (in_python if python or not typable else
           on_the_line if python is False else f"{on_the_line} (in Python: {in_python})")
    if not typable and not python:
        how += " in Python (--map cannot name a class that holds a comma or '=')"
    def shown(names) -> list[str]:  # (an invisible mark as its code point, unquoted)
        return [visible(n)[1:-1] for n in names]

    return (f"{some(shown(alike), 3)} differ{'s' if len(alike) == 1 else ''} from the "
            f"model's {some(shown(alike.values()), 3)} only in {differ}; "
            f"if {'it is' if len(alike) == 1 else 'they are'} the same, pair them: {how}{more}")


def left_out_wording(metrics: dict, names: str, how_to_map: str,
                     python: bool = False) -> str | None:
    """What evaluate says of the images of classes the model does not know (left out of
    every figure), or None; `names` lists them, `how_to_map` is the CLI's --map or the
    library's class_map (`python`)."""
    said = []
    if metrics.get("unknown_classes"):
        left = metrics.get("unknown_class_images", 0)
        classes = counted(len(metrics["unknown_classes"]), "class", "classes")
        said.append(f"{counted(left, 'image')} of {classes} the model does not know "
                    f"{'was' if left == 1 else 'were'} left out: {names} ({how_to_map} names "
                    "one of the model's)")
        if alike := look_alike_hint(metrics.get("look_alike") or {}, python):
            said.append(alike)
    if blank := metrics.get("unlabelled"):
        n = blank["images"]
        said.append(f"{counted(n, 'image')} with no '{blank['level']}' in the data (blank "
                    f"there: a class folder that taxonomy.csv lacks, say) "
                    f"{'was' if n == 1 else 'were'} left out")
    return "; ".join(said) or None


def unreadable_wording(metrics: dict) -> str | None:
    """What evaluate says of the images it could not read (gone since training, broken),
    left out of every figure; None when it read them all."""
    failed = metrics.get("unreadable") or []
    if not failed:
        return None
    path, why = failed[0]
    return (f"{counted(len(failed), 'image')} of the {len(failed) + metrics['images']} "
            f"could not be read and {'was' if len(failed) == 1 else 'were'} left out of "
            f"these figures, e.g. {path}: {why} (all in metrics.json's unreadable)")


def away_wording(u: dict) -> tuple[str, str]:
    """How to say what the open-set figures count: (what a turned-away image is answered,
    a note on which class is named). A model with a taxonomy names its finest level only
    when every level passes its threshold, and then the top-down branch's class."""
    if u.get("named_by") == "branch":
        return ("not named at the finest level (answered a coarser level or unknown)",
                " (the top-down branch's class, as predict names it)")
    return "answered unknown", ""


def at_threshold(u: dict) -> str:
    """What the threshold does to unseen and known images, in a sentence (the terminal and
    a notebook say it alike)."""
    away, branch = away_wording(u)
    where = ("At the thresholds of every level" if branch else
             f"At the threshold ({u['score']} > {u['threshold']:.6g})")
    return (f"{where}: {u['unseen_flagged']:.1%} of unseen images {away}, "
            f"{u['known_turned_away']:.1%} of known ones; known macro-F1{branch} "
            f"{u['known_macro_f1']:.4f} -> {u['known_macro_f1_with_unknown']:.4f}, open-set "
            f"macro-F1 {u['open_macro_f1_without_unknown']:.4f} -> {u['open_macro_f1']:.4f}")


def unknown_section(u: dict | None, split: str, tta: bool = False) -> dict | None:
    if not u:
        return None
    away, branch = away_wording(u)
    limits = (", ".join(f"{lv} {t:.6g}" for lv, t in u["thresholds"].items()) + ": each"
              if u.get("thresholds") else f"{u['threshold']:.6g}:")
    summary = [
        ("score (threshold)", f"{u['score']} ({limits} turns away {u['rate']:.0%} of known "
                              "val images" + (", each a single view, without TTA" if tta
                                              else "") + ")"),
        ("images of unseen classes", u["unseen_images"]),
        *([("classes held out of training (images)", ", ".join(
            f"{c} ({n})" for c, n in u["held_out_classes"].items()))]
          if u.get("held_out_classes") else []),
        ("unreadable images of unseen classes (not scored)", len(u.get("unreadable", []))),
        ("AUROC / FPR at 95% TPR", f"{u['auroc']:.4f} / {u['fpr95']:.4f}"),
        (f"unseen images {away}", f"{u['unseen_flagged']:.1%}"),
        (f"known images {away}", f"{u['known_turned_away']:.1%}"),
        (f"known accuracy without / with the unknown answer{branch}",
         f"{u['known_accuracy']:.4f} / {u['known_accuracy_with_unknown']:.4f}"),
        ("known-class macro-F1 without / with", f"{u['known_macro_f1']:.4f} / "
                                               f"{u['known_macro_f1_with_unknown']:.4f}"),
        ("open-set macro-F1 (known + unseen images) without / with",
         f"{u['open_macro_f1_without_unknown']:.4f} / {u['open_macro_f1']:.4f}")]
    if u.get("unseen_known_at"):
        known_at = u["unseen_known_at"]
        summary.append(("unseen images known down to (level: images)", ", ".join(
            f"{lv}: {n}" for lv, n in known_at.items())
            + f"; unknown: {u['unseen_images'] - sum(known_at.values())}"))
    scores = pd.DataFrame([{"score": s + (" (in use)" if s == u["score"] else "")
                            + INVERTED * (v["auroc"] < 0.5), **v}
                           for s, v in u["scores"].items()])
    named = pd.DataFrame(u.get("unseen_named") or [], columns=["path", "answer",
                                                               "unknown_score"])
    return {"summary": summary, "scores": scores, "named": named,
            "against": f"the known images of the '{split}' split"}
