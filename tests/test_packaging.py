"""What a user who installs a wheel, or a packager who builds from the sdist, gets: the
sdist's tests can run (it left out conftest.py and helpers.py: 20 collection errors), the
license text travels in both, and the version is one number."""

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import wingspan

ROOT = Path(__file__).parents[1]


def test_the_sdist_and_the_wheel_carry_what_they_need(tmp_path):
    # A copy of what git tracks (a build writes build/ and *.egg-info beside the sources)
    source = tmp_path / "src-tree"
    for name in ("pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "Makefile"):
        source.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for folder in ("src", "tests", "bench", "docs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "*.egg-info", "results"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                    f"b.build_sdist({str(out)!r}); b.build_wheel({str(out)!r})"],
                   cwd=source, check=True, capture_output=True)
    version = wingspan.__version__
    with tarfile.open(out / f"wingspan-{version}.tar.gz") as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"tests/conftest.py", "tests/helpers.py", "tests/agreement.py", "LICENSE",
            "Makefile", "bench/levers.py", "docs/tutorial.ipynb"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    with zipfile.ZipFile(out / f"wingspan-{version}-py3-none-any.whl") as wheel:
        files = set(wheel.namelist())
        metadata = wheel.read(f"wingspan-{version}.dist-info/METADATA").decode()
    assert {"wingspan/serve/page.html", "wingspan/py.typed",
            f"wingspan-{version}.dist-info/licenses/LICENSE"} <= files
    assert not any(f.startswith(("tests/", "bench/")) for f in files)
    # The version the package says is the one it is installed as (one number, not two)
    assert re.search(r"^Version: (.*)$", metadata, re.M).group(1) == version
    assert re.search(r"^License-Expression: MIT$", metadata, re.M)
