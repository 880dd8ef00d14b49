"""Checks of the arguments that the API takes, said as the CLI says them: a
keyword that does not exist, a path, a count, a switch, a class map.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from wingspan.config import SPLITS
from wingspan.errors import WingspanError
from wingspan.files import os_error_said


@contextlib.contextmanager
def _os_errors_said():
    """An OSError the CLI puts in words (a read-only run folder, a full disk, a permission)
    raised as that WingspanError, as the README promises: not a bare `OSError [Errno 30]`.
    (A `with` block, not a wrapper: the warnings' stacklevel counts the frames.)"""
    try:
        yield
    except OSError as e:
        said = os_error_said(e)
        if said is None:
            raise
        raise said from e


def _keywords_checked(function):
    """An unknown keyword as a WingspanError naming the closest ones (`run.predict(p,
    topk=2)`: top_k), as the config classes answer (`ws.train(data, epoch_head=1)`), not
    Python's bare TypeError; and OSErrors said as the CLI says them. Functions taking
    **settings leave the keywords to their config."""
    from wingspan.config import check_names

    names = [name for name, p in inspect.signature(function).parameters.items()
             if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    called = function.__qualname__.replace("Run.", "run.").replace("Data.", "data.")

    @functools.wraps(function)
    def checked(*args, **kwargs):
        check_names(kwargs, names, f"{called}() takes no keyword '{{}}'.", "It takes")
        with _os_errors_said():
            return function(*args, **kwargs)

    return checked


def _shown(value) -> str:
    """A wrong argument as a message shows it: its type, and its start on one line."""
    return f"{type(value).__name__} {' '.join(repr(value).split())!s:.60}"


def _table_hint(value) -> str | None:
    """What to do with a table of paths and labels (fastai's from_df habit), which
    wingspan reads from a CSV: its paths are then kept relative to it, with the runs."""
    if not isinstance(value, pd.DataFrame):
        return None
    return ("Save the table as a CSV and give its path: df.to_csv(\"photos.csv\", "
            "index=False), with the columns path,label[,split][,group][,<level>...] "
            "(paths absolute, or relative to the CSV).")


def _path_arg(name: str, value) -> Path:
    """A file or folder argument, or a WingspanError naming it (not a TypeError later).
    "~" is the user's home, as a shell would read it (a folder named "~" made in the
    current one instead is one a user may later clean up with `rm -rf ~`)."""
    if not isinstance(value, str | os.PathLike):
        raise WingspanError(f"{name}: expected a path (str or Path), got {_shown(value)}.",
                            hint=_table_hint(value))
    if not str(value).strip():  # ("" is the current folder: a run's files landed in it, as
        # an unset variable's would; the command line refuses it alike)
        raise WingspanError(f"{name} is empty: give a path (\".\" for the current folder).")
    return Path(value).expanduser()


def _out_arg(value) -> Path | None:
    """An optional output folder: None (the default place) or a path."""
    return None if value is None else _path_arg("out", value)


_IN_MEMORY = ("Pass image files as paths; save an in-memory image to a file first (or post "
              "it to `wingspan serve`).")


def _paths_arg(value, name: str = "paths") -> list[str]:
    """Files, folders or globs: one, or a list (a tuple, a pandas column...) of them."""
    if isinstance(value, str | os.PathLike):
        return [os.path.expanduser(value)]
    if isinstance(value, pd.DataFrame):  # (iterating one gives its column names)
        column = "'path'" if "path" in value.columns else "NAME"
        raise WingspanError(f"{name}: got a DataFrame; give its column of paths, "
                            f"frame[{column}].")
    # (an image's array, fastai's and Keras's habit, is iterable: it was taken for a list
    # of paths, and said "each must be a path; got ndarray array([[0, 0, 0]," with no hint;
    # an array of strings or objects, `frame["path"].to_numpy()`, is a list of paths)
    pixels = isinstance(value, np.ndarray) and value.dtype.kind not in "UO"
    if pixels or isinstance(value, bytes | bytearray | dict) or not isinstance(value,
                                                                                Iterable):
        raise WingspanError(f"{name}: expected a file, folder or glob, or a list of them; got "
                            f"{type(value).__name__}.", hint=_IN_MEMORY)
    items = list(value)
    odd = [p for p in items if not isinstance(p, str | os.PathLike)]  # None among them too
    if odd:
        raise WingspanError(f"{name}: each must be a path (str or Path); got "
                            f"{_shown(odd[0])}.", hint=None if odd[0] is None else _IN_MEMORY)
    if not items:
        raise WingspanError(f"{name}: got an empty list; give at least one file, folder or "
                            "glob.")
    return [os.path.expanduser(p) for p in items]


def _count_arg(name: str, value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise WingspanError(f"{name}: expected a whole number of at least {least}, got "
                            f"{value!r}.")
    return int(value)


def _switch_arg(name: str, value) -> bool:
    """True or False: "no" or "false" (a string, so true) turned a switch on."""
    if not isinstance(value, bool | np.bool_):
        raise WingspanError(f"{name}: expected True or False, got {type(value).__name__} "
                            f"{value!r:.60}.")
    return bool(value)


def _optional_count(name: str, value) -> int | None:
    return None if value is None else _count_arg(name, value)


def _workers_arg(value) -> int | None:
    """None (sized to the machine) or 0 or more data workers, named as the API names it."""
    return None if value is None else _count_arg("workers", value, least=0)


def _class_map_arg(value) -> dict[str, str] | None:
    """{model class: data class}; the CLI's "a=b" strings (one, or a list) are taken too."""
    if value is None or isinstance(value, dict):
        return value
    texts = [value] if isinstance(value, str) else list(value) if isinstance(
        value, Iterable) else value
    if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
        from wingspan.config import name_pairs

        return name_pairs(list(texts), "class_map")
    raise WingspanError(f"class_map: expected a dict {{model class: data class}}, got "
                        f"{type(value).__name__}.", hint='For example {"admiral": "red_admiral"}.')


def _split_arg(value, unset_means: str = "the test split (else val)") -> str | None:
    """None (the default split) or one of SPLITS or "all", as evaluate's --split."""
    if value is None or (isinstance(value, str) and value in (*SPLITS, "all")):
        return value
    raise WingspanError(f"split: expected one of {', '.join(SPLITS)} or all, got "
                        f"{type(value).__name__} {value!r:.60}.",
                        hint=f"Leave it out for {unset_means}.")


def _rate_arg(value) -> float | None:
    """None (the model's own) or a share strictly between 0 and 1, as --unknown-rate."""
    if value is None or (isinstance(value, float | np.floating) and 0 < value < 1):
        return None if value is None else float(value)
    raise WingspanError(f"unknown_rate: expected a share above 0 and below 1, e.g. 0.05; got "
                        f"{type(value).__name__} {value!r:.60}.")


def _max_pixels(value) -> contextlib.AbstractContextManager:
    """--max-pixels for one call, in its thread only (not the process's environment, as the
    CLI sets it: two calls in two threads may each have their own)."""
    if value is None:
        return contextlib.nullcontext()
    from wingspan.data.images import call_budget

    return call_budget(_count_arg("max_pixels", value))


