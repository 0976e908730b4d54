"""Import every module of the source tree from the INSTALLED scalebio and check that each one,
and every file the package-data globs match, comes from site-packages.

Usage (from a folder outside the checkout, with the wheel's venv):
    python -I .ci/wheel_imports.py SRC
SRC: the source tree the wheel was built from. The module list is derived from its folders and
pyproject's package-dir, so a module or package the wheel lacks fails here by name.
``__main__`` modules run on import: .ci/wheel_check.sh runs ``python -m scalebio --help`` instead.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import sysconfig
from pathlib import Path

import tomllib


def source_modules(src: Path, package_dir: dict[str, str]) -> list[str]:
    """Dotted names of every .py file under the package-dir folders (longest mapping wins)."""
    folders = sorted(((Path(d), p) for p, d in package_dir.items()), key=lambda t: -len(t[0].parts))
    names = set()
    for folder, _ in folders:
        for py in (src / folder).rglob("*.py"):
            rel = py.relative_to(src)
            if "__pycache__" in rel.parts:
                continue
            base, pkg = next((d, p) for d, p in folders if rel.is_relative_to(d))
            parts = [*pkg.split("."), *rel.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            names.add(".".join(parts))
    return sorted(n for n in names if n.rsplit(".", 1)[-1] != "__main__")


def main(src: Path) -> int:
    table = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    bad = []
    modules = source_modules(src, table["package-dir"])
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # report every failure, not just the first
            bad.append(f"{name}: import failed: {type(e).__name__}: {e}")
            continue
        where = Path(mod.__file__).resolve()
        if not any(where.is_relative_to(s) for s in site):
            bad.append(f"{name}: imported from {where}, not from site-packages {sorted(site)}")
    n_data = 0
    for pkg, patterns in table.get("package-data", {}).items():
        pkg_src = src / table["package-dir"][pkg]
        installed = Path(importlib.import_module(pkg).__file__).parent
        for pat in patterns:
            for f in glob.glob(os.path.join(pkg_src, pat), recursive=True):
                rel = Path(f).relative_to(pkg_src)
                n_data += 1
                if not (installed / rel).is_file():
                    bad.append(f"{pkg}: package data {rel} missing from {installed}")
    from scalebio.llm.config_files import load_config

    configs = Path(importlib.import_module("scalebio.llm").__file__).parent / "configs"
    for cfg in sorted(configs.rglob("*.yaml")):
        try:
            load_config(cfg)
        except Exception as e:
            bad.append(f"{cfg}: {type(e).__name__}: {e}")
    print(f"wheel: {len(modules)} modules and {n_data} data files imported/found in site-packages")
    for line in bad:
        print(f"wheel: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
