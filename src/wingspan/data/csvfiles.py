"""Reading the CSV files users write by hand or save from a spreadsheet."""

from __future__ import annotations

import csv
import unicodedata
import warnings
from pathlib import Path

import pandas as pd

from wingspan.errors import CODE_PAGES, WingspanError


def read_csv(path: Path, key: str | None = None, blank_lines: bool = False) -> pd.DataFrame:
    """Every field a string; column names stripped and in NFC, columns with no name and no
    value (the trailing commas a spreadsheet saves) dropped; a row wider than the header is
    an error rather than pandas' silent shift. Separated by commas, or by the semicolons
    (or tabs) a spreadsheet saves where the comma is the decimal point: see `separator`
    (`key`: the column the file must have). `blank_lines`: blank lines kept, as rows of
    empty fields, so that row i is line i + 2 (a record that spans lines apart)."""
    try:
        sep = separator(path, key)
        check_field_counts(path, sep)
        with warnings.catch_warnings():  # the extra fields left out are empty (checked above)
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                                index_col=False, skip_blank_lines=not blank_lines)
            header = pd.read_csv(path, sep=sep, dtype=str, header=None, nrows=1,
                                 keep_default_na=False, index_col=False).iloc[0].tolist()
    except UnicodeDecodeError as e:  # Excel's "CSV (Comma delimited)" on Windows: cp1252;
        data = path.read_bytes()  # its "Unicode Text": UTF-16, with a byte-order mark
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise WingspanError(f"Cannot read the CSV file {path}: it is "
                            + ("UTF-16 text" if utf16 else "not UTF-8 text")
                            + f" ({e if utf16 else first_not_utf8(data)}).",
                            hint="Save it as UTF-8: in Excel, 'CSV UTF-8 (Comma delimited)'; "
                                 "or `iconv -f " + ("utf-16 -t utf-8 OLD.csv > NEW.csv`."
                                                    if utf16 else
                                                    f"CODE_PAGE -t utf-8 OLD.csv > NEW.csv`, "
                                                    f"{CODE_PAGES}.")) from e
    except pd.errors.EmptyDataError as e:  # (pandas: "No columns to parse from file")
        raise WingspanError(f"Cannot read the CSV file {path}: it is empty (no line of column "
                            "names).", hint="The first line must name the columns"
                            + (f" ('{key}' among them)" if key else "") + ", and each line "
                            "below it hold one row.") from e
    except (OSError, pd.errors.ParserError, csv.Error) as e:  # (an OSError's reason alone,
        # not "[Errno 13] Permission denied: 'x.csv'")
        raise WingspanError(f"Cannot read the CSV file {path}: "
                            f"{getattr(e, 'strerror', None) or e}") from e
    # pandas renames a second 'genus' to 'genus.1', which would be read as a level.
    names = [nfc(str(c).strip()) for c in header]
    twice = sorted({c for c in names if c and names.count(c) > 1})
    if twice:
        where = [i + 1 for i, c in enumerate(names) if c == twice[0]]
        raise WingspanError(f"The CSV file {path} has {len(where)} columns named "
                            f"'{twice[0]}' (columns {', '.join(map(str, where))}).",
                            hint="Rename or delete all but one of them.")
    table.columns = [nfc(str(c).strip()) for c in table.columns]
    unnamed = [c for c in table.columns
               if c.startswith("Unnamed: ") and (table[c].str.strip() == "").all()]
    return table.drop(columns=unnamed)


SEPARATORS = (",", ";", "\t")  # Excel in much of Europe saves "CSV" with semicolons


def separator(path: Path, key: str | None = None) -> str:
    """The header's separator, of SEPARATORS: the one that reads it as naming the column
    `key` ('path'), else the one that reads it as the most columns, the first of them on
    a tie (a comma; a header of one column has none). Not merely the first found in it: a
    tab-separated header may hold 'length, mm' or 'genus;species' as a column's name."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next((line for line in f if line.strip()), "")
    columns = {sep: [nfc(c.strip()) for c in next(csv.reader([header], delimiter=sep), [])]
               for sep in SEPARATORS}
    return max(SEPARATORS, key=lambda sep: (
        key is not None and key.lower() in [c.lower() for c in columns[sep]],
        len(columns[sep])))


def first_not_utf8(data: bytes) -> str:
    """Where a file stops being UTF-8, by line: pandas' error gives a byte's position in
    the chunk it was decoding ("position 2325" of a row on line 15,002), no help to find it."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        start, end = data.rfind(b"\n", 0, e.start) + 1, data.find(b"\n", e.start)
        line = data[start:end if end >= 0 else len(data)].strip()
        number = data.count(b"\n", 0, e.start) + 1
        return (f"byte 0x{data[e.start]:02x} on line {number}: "
                + line.decode("utf-8", "backslashreplace")[:120])
    return "a byte that is not UTF-8"


def check_field_counts(path: Path, sep: str = ",") -> None:
    """Every row as wide as the header. pandas would take a row with one field more as an
    index plus shifted columns (its label read as the split, say) without a word."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter=sep)
        header = next((row for row in rows if row), [])  # pandas skips blank lines too
        for row in rows:
            if len(row) > len(header) and any(v.strip() for v in row[len(header):]):
                raise WingspanError(  # line_num: the file's line, quoted line breaks counted
                    f"{path}, line {rows.line_num}: {len(row)} fields where the header "
                    f"({sep.join(header)}) has {len(header)}.",
                    hint=f"Quote values that contain {sep!r}, or fix the row.")


def nfc(text: str) -> str:
    """One spelling for one name: macOS writes folder names decomposed (e + combining
    accent), a CSV typed elsewhere has them composed; compared as text they differ."""
    return unicodedata.normalize("NFC", text)


def name_as_read(text: str) -> str:
    """A class name (a folder's, a CSV's or taxonomy.csv's label) as wingspan reads it:
    without end spaces, in NFC. Whatever compares a name with a model's classes reads it so."""
    return nfc(text.strip())
