"""Dependencies point one way: core ← theory/toy_problems ← llm, and no generic top-level names."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "deepspeed", "accelerate", "datasets")


def test_core_theory_toys_do_not_import_llm_stack():
    code = (
        "import sys, json; import scalebio, scalebio.theory, scalebio.toy_problems, scalebio.cli; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
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
