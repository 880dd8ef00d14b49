"""`Run.evaluate`'s answer: the figures, tables, plots and report of an evaluation."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from wingspan.api.arguments import _keywords_checked
from wingspan.api.display import Html, Image, _frame, _img, _kv
from wingspan.errors import WingspanError

# predictions.csv's columns of numbers; the others (and p:CLASS's names) are text.
NUMBER_COLUMNS = ("probability", "unknown_score", "threshold")


def _table(path: Path, text: list[str] = (), numbers: tuple[str, ...] | None = None
           ) -> pd.DataFrame:
    """An evaluation's CSV with its class names as written: pandas' defaults read classes
    named "NA", "None" or "nan" as missing and "01", "1" and "1.0" as the one number 1.
    `text`: the columns of names; with `numbers`, every column but those and p:CLASS's."""
    if numbers is not None:
        header = pd.read_csv(path, nrows=0).columns
        text = [c for c in header if c not in numbers and not c.startswith("p:")]
    return pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                       na_values=[""])


def _confusion(path: Path) -> pd.DataFrame:
    """confusion.csv: counts, true classes (rows) by predicted ones, named as written."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=0).astype(int)


class Evaluation:
    """What `Run.evaluate` measured: `metrics` (metrics.json), the tables and plots in
    `dir`, and `report_path` (report.html, one self-contained page).

    >>> ev = run.evaluate()
    >>> ev.per_class              # precision, recall, F1, support per class
    >>> ev.report()               # the whole report, embedded in the notebook
    """

    def __init__(self, out_dir: Path, metrics: dict, report: Path):
        self.dir, self.metrics = Path(out_dir).absolute(), metrics
        self.report_path = Path(report).absolute()
        # The tables are read now: a later evaluation into the same folder (after
        # run.calibrate, say) replaces it whole, and this one must keep showing its own.
        self._written = self._stamp()
        self.per_class = _table(self.dir / "per_class.csv", ["class"])
        self.confusion = _confusion(self.dir / "confusion.csv")  # rows: truth
        self.predictions = _table(self.dir / "predictions.csv", numbers=NUMBER_COLUMNS)

    def _stamp(self) -> str | None:
        try:
            return (self.dir / "metrics.json").read_text()
        except OSError:
            return None

    def _files(self) -> Path:
        """The folder, once checked to hold this evaluation's plots and report still."""
        if not self.dir.is_dir():
            raise WingspanError(f"{self.dir}, this evaluation's folder, is gone: its plots "
                                "and report with it (its metrics and tables are kept in this "
                                "object).", hint="Evaluate again for its plots.")
        if self._stamp() != self._written:
            raise WingspanError(
                f"{self.dir} now holds a later evaluation; this one's plots and report were "
                "replaced with it (its metrics and tables are kept in this object).",
                hint="Evaluate again for its plots, or give each evaluation its own folder "
                     "with out=.")
        return self.dir

    @_keywords_checked
    def plot(self, name: str = "confusion") -> Image:
        """One of the evaluation's plots: confusion, reliability, mistakes, curves,
        balance, preview.

        >>> ev.plot("reliability")    # calibration before and after the temperature
        """
        path = self._files() / f"{name}.png"
        if not path.is_file():
            found = sorted(p.stem for p in self.dir.glob("*.png"))
            raise WingspanError(f"No plot '{name}' in {self.dir}.",
                                hint=f"Available: {', '.join(found)}." if found else
                                "It was evaluated with plots=False: evaluate again without it.")
        return Image(path)

    @_keywords_checked
    def report(self, open: bool = False) -> Html:
        """report.html embedded in the notebook; `open=True` also opens it in the browser.

        >>> ev.report()
        """
        self._files()
        if open:
            import webbrowser

            webbrowser.open(self.report_path.resolve().as_uri())
        page = html.escape(self.report_path.read_text(encoding="utf-8"), quote=True)
        # sandbox: the page runs no script of its own, so none runs at all, in case a label
        # (a class name from someone else's data) ever slipped past the report's escaping.
        return Html(f"<iframe sandbox srcdoc=\"{page}\" style='width:100%;height:720px;"
                    "border:1px solid #ddd'></iframe>", self.report_path)

    def __repr__(self) -> str:
        m = self.metrics
        return (f"Evaluation({m['split']} split, {m['images']} images: accuracy "
                f"{m['accuracy']:.4f}, macro-F1 {m['macro']['f1']:.4f}; {self.report_path})")

    def _repr_html_(self) -> str:
        from wingspan.evaluate.metrics import ece_row, summary_rows
        from wingspan.evaluate.wording import answer_rows, at_threshold

        m = self.metrics
        pairs = [("images", m["images"]), *summary_rows(m), ece_row(m),
                 *answer_rows(m.get("answers")),
                  ("are these figures fair?", m["fair"]), ("report", self.report_path)]
        parts = [_kv(f"Evaluation: {m['split']} split, level '{m['level']}'", pairs)]
        if u := m.get("unknown"):  # evaluated with unknown=: the unseen images' figures
            scores = pd.DataFrame({(f"{name} (in use)" if name == u["score"] else name):
                                   {"AUROC": v["auroc"], "FPR at 95% TPR": v["fpr95"]}
                                   for name, v in u["scores"].items()}).T
            parts.append(f"<b>Unknown images: {u['unseen_images']} of unseen classes against "
                         f"the known ones</b>" + _frame(scores, "{:.4f}")
                         + f"<p>{html.escape(at_threshold(u))}</p>")
        if m.get("hierarchy"):
            levels = pd.DataFrame({lv: {"micro-F1": v["micro_f1"]}
                                   for lv, v in m["hierarchy"]["levels"].items()})
            parts.append("<b>Per level (consistent predictions)</b>" + _frame(levels))
        plots = [("confusion", 380), ("reliability", 380), ("curves", 780)]
        if self._stamp() == self._written:  # (a later evaluation's plots are not this one's)
            parts.append("<div>" + "".join(_img(self.dir / f"{n}.png", n, w) for n, w in plots
                                           if (self.dir / f"{n}.png").is_file()) + "</div>")
        return "<div>" + "".join(parts) + "</div>"
