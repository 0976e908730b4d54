"""Dependencies point one way: core ← theory/toy_problems ← llm, and inside llm data ← engines ←
loop ← pipeline/baselines/tasks; no generic top-level names.

Two checks per rule: every ``import`` statement anywhere in a layer's files (function-level, lazy
ones too) read with ``ast``, and what importing the whole layer actually loads (``sys.modules`` of
a fresh interpreter), which also catches a forbidden module reached through a third one.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("transformers", "deepspeed", "accelerate", "datasets")
ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (pyproject.toml [tool.setuptools] package-dir)
FOLDERS = {"scalebio": "scalebio", "theory": "scalebio.theory",
           "toy_problems": "scalebio.toy_problems", "llm": "scalebio.llm"}
CORE = ("scalebio.theory", "scalebio.toy_problems")  # plus scalebio itself, minus scalebio.llm
LLM = "scalebio.llm"
# layer -> (modules it may never import, documented exceptions {module: allowed import})
RULES = {
    # the CLI dispatches to llm lazily; the core never loads the LLM stack either
    "core": ((LLM, *HEAVY), {"scalebio.cli": (f"{LLM}.cli",)}),
    f"{LLM}.data": ((f"{LLM}.engines", f"{LLM}.loop", f"{LLM}.pipeline"), {}),
    f"{LLM}.engines": ((f"{LLM}.loop", f"{LLM}.pipeline", f"{LLM}.baselines", f"{LLM}.tasks"),
                       {}),
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the source tree (``__main__`` left out: it runs
    the CLI on import)."""
    out = {}
    for folder, pkg in FOLDERS.items():
        for py in (ROOT / folder).rglob("*.py"):
            parts = py.relative_to(ROOT / folder).with_suffix("").parts
            if "__pycache__" in parts or parts[-1] == "__main__":
                continue
            out[".".join([pkg, *parts]).removesuffix(".__init__")] = py
    return out


def _layer(layer: str, modules: dict[str, Path]) -> list[str]:
    if layer == "core":
        return [m for m in modules if m == "scalebio" or
                (m.startswith("scalebio.") and not _within(m, LLM))]
    return [m for m in modules if _within(m, layer)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imported_names(name: str, path: Path) -> set[str]:
    """Every module an ``import``/``from … import`` anywhere in the file names (relative imports
    resolved; ``from pkg import x`` counts as pkg.x too, since x may be a sub-module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("layer", list(RULES))
def test_import_statements_point_one_way(layer):
    modules = _modules()
    forbidden, allowed = RULES[layer]
    members = _layer(layer, modules)
    assert members, f"no module found for layer {layer}"
    bad = sorted(
        f"{m} imports {imp}" for m in members for imp in _imported_names(m, modules[m])
        if any(_within(imp, f) for f in forbidden)
        and not any(_within(imp, a) for a in allowed.get(m, ()))
    )
    assert not bad, bad


@pytest.mark.parametrize("layer", list(RULES))
def test_importing_a_layer_loads_nothing_it_must_not(layer):
    forbidden, _ = RULES[layer]
    members = _layer(layer, _modules())
    if layer == "core":
        assert set(CORE) <= set(members)
    code = (
        "import importlib, json, sys\n"
        f"for m in {members!r}: importlib.import_module(m)\n"
        f"F = {forbidden!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "                        if any(m == f or m.startswith(f + '.') for f in F))))\n"
    )
    # only silences DeepSpeed's CPU warning, should a module import it (deepspeed_zero does not)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_generic_top_level_packages_installed():
    code = (
        "import importlib.util, json; "
        "print(json.dumps({n: importlib.util.find_spec(n) is not None "
        "for n in ('llm', 'theory', 'toy_problems')}))"
    )
    # run from / so that the repository's own folders are not on sys.path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd="/")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"llm": False, "theory": False, "toy_problems": False}
