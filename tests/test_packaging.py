"""The wheel cannot silently lose a module or a shipped config: pyproject.toml lists every package
explicitly (no discovery), so every source folder with .py files must be listed, and its
package-data globs must cover every file under llm/configs. .ci/wheel_check.sh then builds the
wheel, installs it and imports every module from site-packages."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# The folders that install as scalebio, scalebio.theory, scalebio.toy_problems and scalebio.llm.
SOURCE_ROOTS = {"scalebio": "scalebio", "theory": "scalebio.theory",
                "toy_problems": "scalebio.toy_problems", "llm": "scalebio.llm"}


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _dotted(folder: Path, package_dir: dict[str, str]) -> str:
    """The installed dotted name of a source folder, by the longest package-dir entry above it."""
    rel = folder.relative_to(ROOT)
    best = max((Path(d) for d in package_dir.values() if rel.is_relative_to(Path(d))),
               key=lambda d: len(d.parts), default=None)
    if best is None:
        raise AssertionError(f"{rel}: under no [tool.setuptools] package-dir entry")
    pkg = next(p for p, d in package_dir.items() if Path(d) == best)
    return ".".join([pkg, *rel.relative_to(best).parts])


def _source_folders() -> list[Path]:
    """Every folder under the source roots that holds a .py file (caches skipped)."""
    found = set()
    for root in SOURCE_ROOTS:
        for py in (ROOT / root).rglob("*.py"):
            if "__pycache__" not in py.parts:
                found.add(py.parent)
    return sorted(found)


def test_package_dir_maps_the_source_roots():
    package_dir = _setuptools_table()["package-dir"]
    assert {d: p for p, d in package_dir.items()} == SOURCE_ROOTS


def test_every_source_folder_is_a_listed_package():
    table = _setuptools_table()
    listed, package_dir = table["packages"], table["package-dir"]
    assert len(listed) == len(set(listed)), f"duplicates in packages: {listed}"
    folders = _source_folders()
    assert len(folders) >= len(SOURCE_ROOTS)  # the walk found the tree at all
    missing_init = [str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()]
    assert not missing_init, f"folders with .py files but no __init__.py: {missing_init}"
    names = {_dotted(f, package_dir) for f in folders}
    unlisted = sorted(names - set(listed))
    assert not unlisted, f"add to [tool.setuptools] packages in pyproject.toml: {unlisted}"
    stale = sorted(set(listed) - names)
    assert not stale, f"[tool.setuptools] packages names folders that do not exist: {stale}"


def _covered(package_dir_path: Path, patterns: list[str]) -> set[Path]:
    """Files the patterns match, the way setuptools expands package-data (recursive glob)."""
    out = set()
    for pat in patterns:
        out |= {Path(p) for p in glob.glob(os.path.join(package_dir_path, pat), recursive=True)
                if Path(p).is_file()}
    return out


def test_package_data_covers_every_config():
    table = _setuptools_table()
    patterns = table["package-data"]["scalebio.llm"]
    configs = ROOT / "llm" / "configs"
    shipped = {p for p in configs.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert any(p.suffix == ".yaml" for p in shipped)  # the walk found the configs at all
    uncovered = sorted(str(p.relative_to(ROOT)) for p in shipped - _covered(ROOT / "llm", patterns))
    assert not uncovered, f"not matched by package-data {patterns}: {uncovered}"


def test_setuptools_ships_config_subfolders(tmp_path, monkeypatch):
    """The globs also take files in sub-folders of configs (e.g. configs/architectures/*.json),
    as setuptools itself expands them: its build_py on a synthetic tree."""
    from setuptools.dist import Distribution

    table = _setuptools_table()
    for rel in ("llm/__init__.py", "llm/configs/top.yaml", "llm/configs/top.json",
                "llm/configs/architectures/a.json", "llm/configs/deep/er/b.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}\n")
    monkeypatch.chdir(tmp_path)  # setuptools resolves package_dir relative to the cwd
    dist = Distribution({"name": "probe", "package_dir": {"scalebio.llm": "llm"},
                         "packages": ["scalebio.llm"], "package_data": table["package-data"]})
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    files = {f for pkg, _, _, names in build_py.data_files if pkg == "scalebio.llm"
             for f in names}
    assert {"configs/top.yaml", "configs/top.json", "configs/architectures/a.json",
            "configs/deep/er/b.yaml"} <= {f.replace(os.sep, "/") for f in files}, files
