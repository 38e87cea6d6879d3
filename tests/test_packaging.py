"""The install: one ``losstune`` namespace over the repository's folders, nothing left out."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import losstune

REPO = Path(__file__).resolve().parents[1]


def _declared() -> tuple[list[str], dict[str, str]]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return cfg["packages"], cfg["package-dir"]


def test_every_package_folder_is_installed():
    packages, package_dir = _declared()
    found = {"losstune"}
    for top in ("search", "losses", "trainables"):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO).as_posix().replace("/", ".")
            found.add(f"losstune.{rel}")
    assert found == set(packages)
    assert package_dir["losstune"] == "src/losstune"


def test_every_data_file_is_installed():
    """A file of a package folder that is not Python (the report's page template) is package data."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-data", {})
    data_files = [path for top in ("search", "losses", "trainables") for path in (REPO / top).rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts]
    assert data_files  # the report's template at least
    for path in data_files:
        package_folder = next(p for p in path.parents if (p / "__init__.py").is_file())
        package = "losstune." + package_folder.relative_to(REPO).as_posix().replace("/", ".")
        relative = path.relative_to(package_folder).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data.get(package, [])), \
            f"{path.relative_to(REPO)} is not in [tool.setuptools.package-data] {package!r}"


def test_public_api_and_version():
    from losstune.search.config import load_sweep
    from losstune.search.runner import run_sweep
    from losstune.trainables.loop import train

    assert losstune.load_sweep is load_sweep and losstune.run_sweep is run_sweep and losstune.train is train
    assert losstune.__version__.count(".") >= 2
