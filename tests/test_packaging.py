"""pyproject.toml says what the code needs: the Python it is written for, and metadata setuptools accepts
without deprecation warnings."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _minimum_python() -> tuple[int, int]:
    spec = PYPROJECT["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert match, f"requires-python should be a plain lower bound, not {spec!r}"
    return 3, int(match.group(1))


def test_requires_python_and_ruffs_target_agree():
    """ruff's pyupgrade rules then flag code older than the minimum, and its syntax checks code newer than it."""
    major, minor = _minimum_python()
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{major}{minor}"


def test_the_code_parses_and_runs_at_the_minimum_python():
    minimum = _minimum_python()
    assert sys.version_info[:2] >= minimum
    for path in [*ROOT.glob("bot/**/*.py"), *ROOT.glob("cogs/*.py"), *ROOT.rglob("mgie_engine/**/*.py")]:
        ast.parse(path.read_text(), filename=str(path), feature_version=minimum)


# Standard-library features by the Python that brought them. Not exhaustive: the ones this code base uses or
# is likely to reach for; extend it when a newer one comes in.
_NEWER_FEATURES = {
    (3, 11): ("asyncio.timeout(", "asyncio.TaskGroup", "datetime.UTC", "import tomllib", "typing import Self",
              "enum import StrEnum", "sqlite_errorcode", "SQLITE_BUSY", "ExceptionGroup", "except*"),
    (3, 12): ("itertools.batched", "typing import override", "from itertools import batched"),
    (3, 13): ("copy.replace(", "warnings.deprecated", "from warnings import deprecated"),
}


def test_the_code_uses_nothing_newer_than_requires_python():
    minimum = _minimum_python()
    for path in [*ROOT.glob("bot/**/*.py"), *ROOT.glob("cogs/*.py"), *ROOT.rglob("mgie_engine/**/*.py")]:
        text = path.read_text()
        for version, features in _NEWER_FEATURES.items():
            used = [f for f in features if f in text]
            assert version <= minimum or not used, f"{path.name} uses {used} (Python {version}), " \
                f"but requires-python allows {minimum}"


def test_license_is_an_spdx_string_and_setuptools_supports_it():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    requires = " ".join(PYPROJECT["build-system"]["requires"])
    match = re.search(r"setuptools\s*>=\s*(\d+)", requires)
    assert match and int(match.group(1)) >= 77, requires  # 77 is the first to read `license` as SPDX
