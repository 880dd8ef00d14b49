"""`wingspan data download ethec`: a resumable, checked download of a public dataset.

The ETHEC release is one 6 GB zip. A transfer cut at 5 GB must not start again from zero,
and a file that arrives damaged must not be unpacked: the archive grows in `NAME.part`
through HTTP Range requests, is checked against the published md5, then unpacked into a
folder that becomes the dataset only once complete.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from wingspan.errors import WingspanError
from wingspan.files import shared_folder
from wingspan.progress import Bar

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    name: str  # the archive's file name
    url: str
    md5: str
    description: str


SOURCES = {
    "ethec": Source(
        "ETHEC_dataset_v0.2.zip",
        "https://www.research-collection.ethz.ch/bitstream/handle/20.500.11850/365379/"
        "ETHEC_dataset_v0.2.zip?sequence=6&isAllowed=y",
        "d846bc07b0a356d5701bf19942c77b2d",
        "ETH Entomological Collection v0.2 (47,978 specimen photos, 5.98 GB; A. Dhall, 2019, "
        "doi 10.3929/ethz-b-000365379, non-commercial use)"),
}


def download_dataset(name: str, to: str | Path, url: str | None = None,
                     source: Source | None = None, progress: bool = True) -> Path:
    """Download, check and unpack dataset `name` under `to`; returns the dataset's root (a
    folder `wingspan train` reads). A second call reuses what is there; a cut transfer
    resumes; `url` replaces the published address (a mirror)."""
    if source is None:
        if name not in SOURCES:
            raise WingspanError(f"Unknown dataset '{name}'.",
                                hint=f"Available: {', '.join(SOURCES)}.")
        source = SOURCES[name]
    to = Path(to).expanduser()
    root = to / name
    if root.is_dir():  # unpacked before (an empty one: made by the user, not unpacked)
        if not any(root.iterdir()):
            raise WingspanError(f"{root} is an empty folder, where the unpacked dataset "
                                "goes.", hint="Remove it and run the command again, or "
                                              "give another --to.")
        return _dataset_root(root)
    shared_folder(to)  # (in a lab's shared cache: the group's, as the cache's other folders)
    archive = to / source.name
    if not archive.is_file():
        _fetch(url or source.url, archive, progress)
    _check_md5(archive, source.md5, progress)
    _unpack(archive, root)
    return _dataset_root(root)


def _fetch(url: str, archive: Path, progress: bool) -> None:
    """Into `archive.part`, continuing where an earlier transfer stopped."""
    part = archive.with_name(archive.name + ".part")
    done = part.stat().st_size if part.is_file() else 0
    if "://" not in url:  # --url an archive already on this machine (or a shared drive)
        local = Path(url).expanduser()
        if not local.is_file():
            raise WingspanError(f"--url {url} is neither a URL nor a file.",
                                hint="Give http(s)://..., file://..., or the archive's path.")
        url = local.resolve().as_uri()
    try:
        request = urllib.request.Request(url,
                                         headers={"Range": f"bytes={done}-"} if done else {})
    except ValueError as e:
        raise WingspanError(f"--url {url} is not a URL wingspan can fetch: {e}") from e
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and done:  # nothing left to send: the part is whole
            part.replace(archive)
            return
        raise WingspanError(f"Downloading {url} failed: HTTP {e.code} {e.reason}.") from e
    except (urllib.error.URLError, OSError) as e:
        raise WingspanError(f"Cannot reach {url}: {getattr(e, 'reason', e)}.",
                            hint="Check the network (or give a mirror with --url).") from e
    with response:
        resumed = response.status == 206
        if done and not resumed:  # the server ignored the range: start again
            done = 0
        total = int(response.headers.get("Content-Length") or 0) + done
        try:
            with open(part, "ab" if resumed else "wb") as f, \
                    Bar(total, f"Downloading {archive.name}", progress, units="bytes") as bar:
                bar.advance(done)
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.advance(len(chunk))
        except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
            raise WingspanError(
                f"The download of {url} stopped after {part.stat().st_size} of {total} bytes "
                f"({e}).", hint="Run the same command again: it continues from there.") from e
    if total and part.stat().st_size < total:
        raise WingspanError(
            f"The download of {url} stopped after {part.stat().st_size} of {total} bytes.",
            hint="Run the same command again: it continues from there.")
    part.replace(archive)


def _check_md5(archive: Path, expected: str, progress: bool) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with open(archive, "rb") as f, Bar(archive.stat().st_size, "Checking the md5", progress,
                                       units="bytes") as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.advance(len(chunk))
    if digest.hexdigest() != expected:
        kept = archive.with_name(archive.name + ".bad")
        archive.replace(kept)
        raise WingspanError(
            f"The downloaded archive is damaged: its md5 is {digest.hexdigest()}, the published "
            f"one is {expected}. It is kept as {kept} for inspection.",
            hint="Run the same command again to download it afresh (and delete the .bad "
            "file once done).")


def _unpack(archive: Path, root: Path) -> None:
    """Into a temporary folder, renamed to `root` when complete; no member may land
    outside it."""
    tmp = root.with_name(f".{root.name}.unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                target = (tmp / member).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise WingspanError(f"{archive} holds a path outside its folder: {member}")
            z.extractall(tmp)
    except zipfile.BadZipFile as e:
        raise WingspanError(f"{archive} is not a readable zip file: {e}") from e
    tmp.replace(root)


def _dataset_root(root: Path) -> Path:
    """The folder in `root` (itself, or one or two levels down) that the ETHEC reader
    reads: the one with the split files."""
    from wingspan.data.ethec import is_ethec_root

    for candidate in (root, *sorted(root.glob("*/")), *sorted(root.glob("*/*/"))):
        if is_ethec_root(candidate):
            return candidate
    raise WingspanError(f"{root} holds no ETHEC split files (splits/train.json ...).",
                        hint=f"If it was unpacked here by wingspan, the archive's layout may "
                             f"have changed (see its README); else remove {root} or give "
                             "another --to.")
