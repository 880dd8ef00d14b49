"""`report.html`: one self-contained page for a run; every plot is embedded. An evaluation's
sections for it: `write_evaluation_report`. `runs.html`, a runs folder's: `write_runs_page`."""

from __future__ import annotations

import base64
import html
from functools import partial
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from wingspan.data.samples import SPLIT
from wingspan.errors import counted, rounded
from wingspan.evaluate.wording import (
    absent_rows,
    answer_rows,
    epochs_run,
    kept_rows,
    recipe_wording,
    tree_wording,
    unknown_section,
)
from wingspan.files import name_part, write_text
from wingspan.pages import VIEWPORT, href, relative_link, spelt_out
from wingspan.training.folder import CONFIG_FILE, HISTORY_FILE, train_again


def _figure(path: Path | None, alt: str, missing: str = "not available",
         beside: Path | None = None) -> str:
    """The PNG embedded; with `beside` (the report's folder), a link to its file too: on a
    phone a figure 1,500 px wide shows at a quarter of its size, its text 2-4 px high."""
    if not path or not Path(path).is_file():
        return f"<p class='missing'>({html.escape(alt)}: {html.escape(missing)})</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    img = f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
    if beside is None:
        return img
    return (f"<a href='{quote(relative_link(path, beside))}' title='the figure at full size'>"
            f"{img}</a>")


def _table(frame: pd.DataFrame, floats: str = "{:.4f}", escape: bool = True) -> str:
    """(escape=False: cells already HTML, escaped by the caller, links in them)"""
    # Headers in words: share_of_true, train_images_per_s read as code (the CSVs keep them)
    frame = frame.rename(columns=lambda c: c.replace("_", " ") if isinstance(c, str) else c)
    table = frame.to_html(index=False, border=0, classes="t", escape=escape, na_rep="-",
                          float_format=lambda v: floats.format(v))  # ("-": as the terminal)
    named = html.escape("table of " + ", ".join(map(str, frame.columns[:4])), quote=True)
    return f"<div class='scroll' role='region' tabindex='0' aria-label='{named}'>{table}</div>"


# A table of more rows than this (one a class: ETHEC has 561) shows its first SHOWN_ROWS and
# folds the rest under a <details>: 300 classes in full were 8,000 px each, the metrics
# 10,600 px down the page. (Folded rows stay in the page: find in page opens them.)
LONG_TABLE = 30
SHOWN_ROWS = 20


def _long_table(frame: pd.DataFrame, floats: str, rest: str) -> str:
    """The first SHOWN_ROWS rows, then the others under a closed <details> whose summary
    is `rest` ({n}: how many); a short table whole."""
    if len(frame) <= LONG_TABLE:
        return _table(frame, floats)
    summary = html.escape(rest.format(n=len(frame) - SHOWN_ROWS))
    return (_table(frame.iloc[:SHOWN_ROWS], floats) + f"<details><summary>{summary}</summary>"
            + _table(frame.iloc[SHOWN_ROWS:], floats) + "</details>")


def _confused(pairs: pd.DataFrame | None, total: int | None, level: str | None = None
              ) -> list[str]:
    """The most confused pairs' table, headed with how many of all it shows; a coarser
    `level`'s names it (its matrix is confusion_<level>.csv), in its heading and columns
    (tables alike in their first columns were landmarks of one name to a screen reader)."""
    if pairs is None or not len(pairs):
        return []
    of, csv = "", "confusion.csv"
    if level:
        of, csv = f": {level}", f"confusion_{name_part(level)}.csv"
        pairs = pairs.rename(columns={"true": f"true {level}",
                                      "predicted": f"predicted {level}"})
    if (total or 0) > len(pairs):
        of += f" ({len(pairs)} of {total} pairs; all in {csv})"
    return [f"<div><h3>Most confused{html.escape(of)}</h3>", _table(pairs, "{:.2f}"), "</div>"]


def _kv(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in pairs)
    # (in a focusable region as _table's: a long value, an ETHEC run's path, scrolls it on
    # a phone, and a scrolling box must be reachable by keyboard)
    named = html.escape("table of " + ", ".join(str(k) for k, _ in pairs[:3]), quote=True)
    return (f"<div class='scroll' role='region' tabindex='0' aria-label='{named}'>"
            f"<table class='t kv'>{rows}</table></div>")


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
img{max-width:100%;border:1px solid #eee}table.t{border-collapse:collapse;margin:.5em 0}
.scroll{max-width:100%;overflow-x:auto;background:
linear-gradient(to right,#fff 30%,#fff0) left/40px 100% no-repeat local,
linear-gradient(to left,#fff 30%,#fff0) right/40px 100% no-repeat local,
radial-gradient(farthest-side at 0 50%,#0003,#0000) left/14px 100% no-repeat scroll,
radial-gradient(farthest-side at 100% 50%,#0003,#0000) right/14px 100% no-repeat scroll}
.t td,.t th{padding:.2em .7em;border-bottom:1px solid #eee;text-align:left;
overflow-wrap:break-word}
.kv th{color:#555;font-weight:500}.kv td{overflow-wrap:anywhere}
.missing{color:#666;font-style:italic}
.grid{display:flex;gap:2em;flex-wrap:wrap}
.grid>*{min-width:0;max-width:100%}
"""
# (.scroll: a table wider than a phone scrolls in its own box, a shadow at the edge that
# hides columns, reachable by keyboard (tabindex) and named for a screen reader.)
# (overflow-wrap: break-word, not anywhere: anywhere let each cell shrink to one character,
# so a table never outgrew a phone's screen to scroll, and 0.0000 read "0.00" over "00")


def write_report(path: Path, title: str, sections: dict) -> Path:
    """Sections (all optional): overview, data, balance_png, preview_png, curves_png,
    summary, transfer, per_class, confusion_png, confused, level_confusion_pngs ({level:
    png}, each beside hierarchy's most confused pairs there), levels, hierarchy,
    mistakes_png, mistakes_shown (its captions as a table), calibration, reliability_png,
    unknown, unknown_png, profile; run_files (the run's, linked beside the report's own);
    no_plots (the figures were not asked for: each says so in its place); all_right (no
    mistakes to show)."""
    s = sections
    _img = partial(_figure, beside=Path(path).parent)  # (each figure links to its file)
    missing = ("not drawn: evaluated with --no-plots (plots=False in Python)"
               if s.get("no_plots") else "not available")
    parts = [f"<h1>{html.escape(title)}</h1>", _kv(s.get("overview", []))]
    parts += ["<h2>Data</h2>"]
    if s.get("data") is not None and len(s["data"]) > LONG_TABLE:  # (alphabetical: the
        # first rows say nothing more than the others; the balance plot says the spread)
        parts += [f"<details><summary>Images per class and split: {len(s['data'])} classes"
                  "</summary>", _table(s["data"], "{:.0f}"), "</details>"]
    elif s.get("data") is not None:
        parts.append(_table(s["data"], "{:.0f}"))
    parts.append(_img(s.get("balance_png"), "class balance", missing))
    parts += ["<h2>Augmentation</h2>",
              _img(s.get("preview_png"), "augmentation preview", missing)]
    parts += ["<h2>Training curves</h2>",
              _img(s.get("curves_png"), "training curves: loss, accuracy and macro-F1 per "
                   "epoch, train solid and val dashed", missing)]
    parts += ["<h2>Metrics</h2>", _kv(s.get("summary", []))]
    if s.get("levels") is not None:
        h = s["hierarchy"]
        depth = ", ".join(f"{d}: {n}" for d, n in h["mistake_depth"].items())
        per_level = pd.DataFrame([{"level": lv, "accuracy": m["accuracy"],
                                   "macro-F1": m["macro_f1"], "micro-F1": m["micro_f1"]}
                                  for lv, m in h["levels"].items()])
        parts += ["<h3>Per taxonomic level (the predicted branch)</h3>", _table(per_level),
                  "<h3>F1 per taxonomic level (micro-F1 as published for ETHEC)</h3>",
                  _table(s["levels"]),
                  _kv([("consistent predictions (marginalised)",
                        f"{h['consistency']['marginalised']:.1%}"),
                       ("consistent predictions (per-level heads)",
                        "-" if h["consistency"]["heads"] is None
                        else f"{h['consistency']['heads']:.1%}"),
                       ("mistake depth (0 = right; 1 = right parent; ...): images", depth),
                       ("rare classes (trained at the parent level)",
                        h.get("rare", {}).get("images", 0))])]
    if s.get("transfer") is not None:
        own = s.get("transfer_own")
        of = (f" (own data: its {html.escape(own['split'])} split"
              + (f"; {own['unreadable']} of its {own['images']} images could not be read, "
                 "gone since" if own["unreadable"] else "") + ")") if own else ""
        parts += ["<h3>Transfer: recall per class on the model's own data and on this data"
                  f"{of}</h3>", _long_table(s["transfer"], "{:.4f}", "The other {n} classes")]
    if s.get("per_class") is not None:  # the classes to look at first, first
        worst = s["per_class"].sort_values(["f1", "support"], ascending=[True, False],
                                           kind="stable")
        parts += ["<h3>Per class (lowest F1 first)</h3>",
                  _long_table(worst, "{:.4f}", "The other {n} classes (all in per_class.csv)")]
    parts += ["<h2>Confusion matrix</h2><div class='grid'>",
              _img(s.get("confusion_png"), "confusion matrix: rows the true class, columns "
                   "the predicted one (the counts in confusion.csv)", missing)]
    parts += [*_confused(s.get("confused"), s.get("confused_pairs")), "</div>"]
    for level, png in (s.get("level_confusion_pngs") or {}).items():
        m = s["hierarchy"]["levels"][level]
        parts += [f"<h3>Confusion matrix: {html.escape(level)}</h3><div class='grid'>",
                  _img(png, f"confusion matrix of {level}", missing),
                  *_confused(pd.DataFrame(m.get("most_confused", [])),
                             m.get("confused_pairs"), level), "</div>"]
    if s.get("all_right"):  # (no gallery to explain, nor an image saying "no mistakes")
        parts += ["<h2>Most confident mistakes</h2><p>None: every image here was answered "
                  "right.</p>"]
    else:
        parts += ["<h2>Most confident mistakes</h2><p>Each: the image as the model saw it, "
                  "and beside it the same under the Grad-CAM of the wrong class it named "
                  "(the brightest yellow: where it found the most evidence for that class; "
                  "dark purple: the least).</p>",
                  _img(s.get("mistakes_png"), "the most confident mistakes, each image "
                       "beside its Grad-CAM of the class named (every answer in "
                       "predictions.csv)", missing)]
        if s.get("mistakes_shown") is not None and len(s["mistakes_shown"]):
            parts += ["<details><summary>The same mistakes as a table</summary>",
                      _table(s["mistakes_shown"].assign(probability=lambda f: f[
                          "probability"].map(lambda p: rounded(p, 2))), "{:.2f}"),
                      "</details>"]
    if s.get("unknown"):
        parts += ["<h2>Unknown images</h2><p>Images of classes the model never saw, scored "
                  f"against {html.escape(s['unknown']['against'])}: right of the threshold, "
                  "the answer is \"unknown\".</p>", _kv(s["unknown"]["summary"]),
                  _img(s.get("unknown_png"), "unknown score histogram", missing)]
        named = s["unknown"].get("named")
        if named is not None and len(named):
            parts += ["<h3>Unseen images given a class (the surest first; every image in "
                      "unknown.csv)</h3>", _table(named, "{:.6f}")]  # (the threshold's digits)
        parts += ["<h3>Every score the model holds</h3>", _table(s["unknown"]["scores"])]
    parts += ["<h2>Calibration</h2>", _kv(s.get("calibration", [])),
              _img(s.get("reliability_png"), "reliability diagram", missing)]
    if s.get("profile") is not None:
        parts += ["<h2>Where the time went (seconds per stage; training images per second)"
                  "</h2>", _table(s["profile"], "{:.1f}")]
    # The figures' files beside the report, linked (relative: the folder moves as one).
    files = sorted(p.name for p in Path(path).parent.glob("*")
                   if p.suffix in (".csv", ".json") and p.is_file())
    run = [f"<a href='{quote(relative_link(f, Path(path).parent))}'>{html.escape(f.name)}</a>"
           for f in s.get("run_files") or []]
    links = [", ".join(f"<a href='{quote(name)}'>{html.escape(name)}</a>" for name in files),
             "the run's: " + ", ".join(run) if run else ""]
    if files or run:
        parts.insert(2, "<p>Files: " + "; ".join(filter(None, links)) + "</p>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}"
            f"</title>{VIEWPORT}<style>{STYLE}</style></head><body><main>{''.join(parts)}</main>"
            "</body></html>")
    write_text(path, page)
    return path


def write_runs_page(path: Path, title: str, frame: pd.DataFrame, cells: pd.DataFrame,
                    notes: list[str]) -> Path:
    """`wingspan runs --output runs.html`: the table (`cells`, the terminal's text of each
    run of `frame`, its name first), each name linked to the run's report, else its
    config.yaml; the finished runs' val macro-F1 per epoch in one figure; and `notes`, the
    table's caption. Self-contained as report.html (the figure embedded)."""
    import tempfile

    from wingspan.errors import WingspanError
    from wingspan.evaluate.plots import plot_runs_f1
    from wingspan.run_table import DONE
    from wingspan.training.folder import read_history

    parts = [f"<h1>{html.escape(title)}</h1>"]
    if frame.empty:  # (and why, where some folders could not be read)
        parts += ["<p>No runs here.</p>", *(f"<p>{html.escape(note)}</p>" for note in notes)]
    else:
        cells = cells.map(lambda c: html.escape(str(c)))
        targets = [_run_link(Path(run)) for run in frame["path"]]
        cells.iloc[:, 0] = [f"<a href='{href(t, Path(path).parent)}'>{c}</a>" if t else c
                            for c, t in zip(cells.iloc[:, 0], targets, strict=True)]
        parts += [_table(cells, escape=False),
                  *(f"<p>{html.escape(note)}</p>" for note in notes)]
        histories = {}
        for run in frame[frame["status"] == DONE].itertuples():  # (a stopped run's curve
            try:  # ends mid-way, read as the end of a finished one's)
                histories[run.name] = read_history(Path(run.path))
            except (WingspanError, OSError):  # a history lost or garbled: the row stays
                pass
        with tempfile.TemporaryDirectory() as tmp:  # (drawn to embed, then gone)
            png = plot_runs_f1(histories, Path(tmp) / "f1.png") if histories else None
            parts += ["<h2>Val macro-F1 per epoch</h2>",
                      _figure(png, "val macro-F1 per epoch of each finished run, one line a "
                              "run named in the legend, head then fine-tune epochs in "
                              "sequence (each run's best in the table's val F1)",
                              "no finished run with a history.csv")]
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title>{VIEWPORT}<style>{STYLE}</style></head><body><main>"
            f"{''.join(parts)}</main></body></html>")
    write_text(path, spelt_out(page))
    return path


def _run_link(run_dir: Path) -> Path | None:
    """What a run's name on the runs page opens: its report on the held-out split, else its
    latest report, else its config.yaml (None without one: a run killed while set up)."""
    reports = sorted(run_dir.glob("evaluation-*/report.html"), key=lambda p: (
        p.parent.name != "evaluation-test", -p.stat().st_mtime))
    return reports[0] if reports else (run_dir / CONFIG_FILE
                                       if (run_dir / CONFIG_FILE).is_file() else None)


# The run's files a report links: its settings (and the line to train it again), its log
# and its curves' figures; an adapted run's adapt.json (it has no train.log of its own).
RUN_FILES = (CONFIG_FILE, "train.log", HISTORY_FILE, "adapt.json")


def _recipe(training: dict, run_dir: Path | None, out_dir: Path
            ) -> tuple[list[tuple[str, str]], list[Path]]:
    """The overview's rows of how the model was trained (the settings not the defaults,
    and config.yaml's line to train it again), and the run's files to link: only from a
    report inside the run folder, which moves as one (one written elsewhere with --out may
    be moved alone, its links then broken unsaid)."""
    rows = [("how it was trained (settings not the defaults)",
             recipe_wording(training))] if training else []
    again = train_again(run_dir) if run_dir else None
    if again:  # (an adapted run's config.yaml is that of the run it was adapted from)
        rows.append(("to train it again" + (", then adapt it" if training.get("adapted")
                                            else ""), again))
    inside = run_dir is not None and Path(out_dir).resolve().is_relative_to(
        Path(run_dir).resolve())
    return rows, [run_dir / n for n in RUN_FILES if inside and (run_dir / n).is_file()]


def write_evaluation_report(out_dir, name, predictor, dataset, level, split, metrics, table,
                            confused, pngs, levels_table=None, transfer=None,
                            plots: bool = True, run_dir: Path | None = None) -> Path:
    # (here, not above: they import torch, which `wingspan runs`' page has no need of)
    from wingspan.evaluate.calibration import bound_warning
    from wingspan.evaluate.metrics import summary_rows

    manifest = predictor.manifest
    data_table = pd.crosstab(dataset.table[level], dataset.table[SPLIT].replace("", "all"))
    data_table.columns.name = None  # else an empty column headed "split"
    order = ["train", "val", "test", "all"]  # the recipe's order, not the alphabet's
    data_table = data_table[sorted(data_table.columns, key=lambda c: (
        order.index(c) if c in order else len(order), str(c)))]
    data_table.insert(0, "class", data_table.index)
    summary = [("images evaluated", metrics["images"]), *summary_rows(metrics),
               ("unreadable images", len(metrics["unreadable"])),
               ("images of classes the model does not know (left out)",
                f"{counted(metrics.get('unknown_class_images', 0), 'image')} of "
                + counted(len(metrics["unknown_classes"]), "class", "classes")
                + (f": {', '.join(metrics['unknown_classes'][:8])}"
                   if metrics["unknown_classes"] else "")
                if metrics["unknown_classes"] else "none"),
               *([(f"images with no '{metrics['unlabelled']['level']}' in the data (left out)",
                   metrics["unlabelled"]["images"])] if metrics.get("unlabelled") else []),
               *absent_rows(metrics.get("absent_classes"), metrics.get("answered_absent", 0),
                            metrics["images"], metrics.get("answered_only_classes")),
               *answer_rows(metrics.get("answers")),
               ("inference speed", f"{metrics['images_per_second']} images/s on "
                f"{metrics['engine']}")]
    cal = metrics["calibration"]
    calibration = [("temperature", f"{metrics['temperature']:.3f}"),
                   ("ECE before / after", f"{metrics['ece_uncalibrated']:.4f} / "
                    f"{metrics['ece']:.4f}")]
    if cal.get("same_data_as_evaluation"):
        calibration.append(("note", "the temperature was fitted on the images being "
                            "evaluated (or some of them): the ECE after is optimistic"))
    if metrics.get("tta_note"):
        calibration.append(("test-time augmentation", metrics["tta_note"]))
    if bound_warning(cal):
        calibration.append(("warning", bound_warning(cal)))
    if cal.get("method", "likelihood") != "likelihood":
        calibration.append(("set by", f"the {cal['method']}: every one of the "
                            f"{cal.get('images')} images it was fitted on was right"))
    elif cal.get("images"):
        calibration.append(("set by", f"the likelihood of {cal['images']} images "
                            f"({cal.get('fitted_on', 'val')})"))
    training = manifest.get("training", {})
    train_metrics = manifest.get("metrics", {})
    recipe, run_files = _recipe(training, run_dir, out_dir)
    overview = [("model", predictor.bundle), ("backbone", manifest["model"]["backbone"]),
                ("weights", manifest.get("weights_source")),
                ("levels (coarse to fine), scored at each" if predictor.taxonomy else "level",
                 " > ".join(predictor.taxonomy.levels) if predictor.taxonomy else level),
                ("classes", len(predictor.classes)), ("evaluated split", split),
                # The figures first, with whether they are fair: the val figure below is
                # the optimistic one, which a reader skimming the top took for the score.
                *[row for row in summary_rows(metrics)
                  if row[0] in ("accuracy", "macro precision / recall / F1")],
                ("are these figures fair?", metrics["fair"]),
                ("test-time augmentation", "on: each image's flips and crops averaged, as "
                 "predict --tta" if metrics.get("tta") else "off"),
                *([("adapted", f"by `wingspan adapt` from {adapted['adapted_from']} on "
                    f"{counted(adapted['photos'], 'unlabelled photo')}"
                    + (f" (and {adapted['earlier_photos']} more that one was adapted on)"
                       if adapted.get("earlier_photos") else "") + ": its backbone, the "
                    "training epochs and the training curves below are that run's, before "
                    "adapting (adapt.json says what adapting did)")]
                  if (adapted := training.get("adapted")) else []),
                ("training epochs (head + fine-tune)", epochs_run(training, train_metrics)),
                *kept_rows(train_metrics), *recipe,
                *([("taxonomy", said)] if (said := tree_wording(metrics)) else [])]
    profile = None
    if train_metrics.get("profile"):
        profile = pd.DataFrame([{"stage": s, **v} for s, v in train_metrics["profile"].items()])
    title = f"wingspan report: {name}" + (" (test-time augmentation)" if metrics["tta"] else "")
    return write_report(out_dir / "report.html", title,
                        {"overview": overview, "data": data_table,
                         "balance_png": pngs.get("balance"),
                         "preview_png": pngs.get("preview"), "curves_png": pngs.get("curves"),
                         "summary": summary, "per_class": table,
                         "confusion_png": pngs.get("confusion"),
                         "level_confusion_pngs": pngs.get("levels"),
                         "confused": pd.DataFrame(confused),
                         "confused_pairs": metrics.get("confused_pairs"),
                         "mistakes_png": pngs.get("mistakes"),
                         "mistakes_shown": pngs.get("mistakes_shown"),
                         "calibration": calibration, "reliability_png": pngs.get("reliability"),
                         "profile": profile, "levels": levels_table, "transfer": transfer,
                         "transfer_own": metrics.get("transfer_own"),
                         "hierarchy": metrics.get("hierarchy"),
                         "unknown": unknown_section(metrics.get("unknown"),
                                                     metrics["split"], metrics["tta"]),
                         "unknown_png": pngs.get("unknown"), "no_plots": not plots,
                         "run_files": run_files,
                         "all_right": metrics["accuracy"] == 1.0})
