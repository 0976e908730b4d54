"""``scalebio validate``: files, JSON schema, exit codes and the refusal rules, on fake claims.

The three claims modules are replaced by fakes (in ``sys.modules`` and as package attributes, so
the explicit ``from . import claims_*`` in validate.py picks them up); the last test runs the real
ones end to end in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import scalebio.theory as theory_pkg
from scalebio import cli
from scalebio.theory import validate
from scalebio.theory.report import Claim

MODULES = ("claims_bias", "claims_convergence", "claims_weights")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLAIM_KEYS = {"name", "problem", "measured", "bound", "passed", "detail"}
REPO = Path(__file__).resolve().parents[2]
# The real --quick run takes ~30 s of CPU (70 s wall on a loaded 2-core box); 300 s is a hang.
E2E_TIMEOUT_S = 300


def _bias(passed: bool = True) -> Claim:
    alpha = [1.0, 10.0, 100.0]
    return Claim("bias_O(1/alpha)", "quadratic(d=4)", -1.01, -0.9, passed, "slope ≤ −0.9",
                 {"kind": "bias_vs_alpha", "alpha": alpha, "error": [1.0, 0.1, 0.01],
                  "bound": [2.0, 0.2, 0.02], "slope": -1.0})


def _stationarity() -> Claim:
    iters = list(range(1, 6))
    return Claim("stationarity_rate", "quadratic(d=4)", 0.02, 0.05, True, "‖∇Φ‖ under bound",
                 {"kind": "stationarity", "iters": iters, "grad_norm": [1 / t for t in iters],
                  "bound": [2 / t for t in iters], "slope": -1.0})


def _weights() -> Claim:
    rows = [[0.5, 0.5], [0.7, 0.3], [0.8, 0.2]]
    return Claim("weights_to_optimum", "reweighting(K=2)", 0.01, 0.05, True, "‖π − π*‖₁",
                 {"kind": "weights", "iters": [0, 1, 2], "weights": rows, "optimum": [0.8, 0.2],
                  "names": ["clean", "noisy"]})


@pytest.fixture
def install(monkeypatch):
    """install(claims_bias=fn, ...) replaces each claims module by one whose run_claims is fn."""
    calls: list[tuple[str, bool]] = []

    def _install(**run_claims_by_module):
        for name in MODULES:
            fn = run_claims_by_module[name]
            module = types.ModuleType(f"scalebio.theory.{name}")

            def run_claims(quick: bool = True, _fn=fn, _name=name):
                calls.append((_name, quick))
                return _fn()

            module.run_claims = run_claims
            monkeypatch.setitem(sys.modules, module.__name__, module)
            monkeypatch.setattr(theory_pkg, name, module, raising=False)
        return calls

    return _install


def _all_pass(install):
    return install(claims_bias=lambda: [_bias()], claims_convergence=lambda: [_stationarity()],
                   claims_weights=lambda: [_weights()])


def test_all_pass_writes_every_file_and_exits_0(install, tmp_path, capsys):
    calls = _all_pass(install)
    out = tmp_path / "report"
    assert validate.main(["--quick", "--out", str(out)]) == 0
    assert calls == [(m, True) for m in MODULES]
    names = {p.name for p in out.iterdir()}
    assert names == {"report.json", "report.md", "stationarity.png", "bias_vs_alpha.png",
                     "weights.png"}
    for png in ("stationarity.png", "bias_vs_alpha.png", "weights.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temp folder left behind
    stdout = capsys.readouterr().out
    assert "3/3 claims passed" in stdout and "bias_O(1/alpha)" in stdout


def test_json_schema_and_values(install, tmp_path):
    _all_pass(install)
    out = tmp_path / "r"
    validate.main(["--out", str(out)])
    doc = json.loads((out / "report.json").read_text())
    assert {"claims", "quick", "seconds", "versions"} <= set(doc)
    assert doc["quick"] is False
    assert isinstance(doc["seconds"], float) and doc["seconds"] >= 0
    assert {"python", "torch", "numpy", "scipy", "matplotlib", "scalebio"} <= set(doc["versions"])
    assert [set(c) for c in doc["claims"]] == [CLAIM_KEYS] * 3
    assert [c["name"] for c in doc["claims"]] == [
        "bias_O(1/alpha)", "stationarity_rate", "weights_to_optimum"]
    first = doc["claims"][0]
    assert (first["measured"], first["bound"], first["passed"]) == (-1.01, -0.9, True)
    assert first["problem"] == "quadratic(d=4)" and first["detail"] == "slope ≤ −0.9"


def test_markdown_has_table_rows_and_images(install, tmp_path):
    _all_pass(install)
    out = tmp_path / "r"
    validate.main(["--out", str(out)])
    md = (out / "report.md").read_text()
    assert "| claim | problem | measured | bound | result |" in md
    assert "| bias_O(1/alpha) | quadratic(d=4) | -1.01 | -0.9 | pass |" in md
    for png in ("stationarity.png", "bias_vs_alpha.png", "weights.png"):
        assert f"]({png})" in md


def test_one_failed_claim_exits_1_and_names_it(install, tmp_path, capsys):
    install(claims_bias=lambda: [_bias(passed=False)], claims_convergence=lambda: [_stationarity()],
            claims_weights=lambda: [_weights()])
    assert validate.main(["--out", str(tmp_path / "r")]) == 1
    assert "FAILED: bias_O(1/alpha)" in capsys.readouterr().out
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [c["passed"] for c in doc["claims"]] == [False, True, True]


def test_raising_run_claims_is_a_failed_claim(install, tmp_path, capsys):
    def boom():
        raise RuntimeError("inner solver diverged")

    install(claims_bias=lambda: [_bias()], claims_convergence=boom,
            claims_weights=lambda: [_weights()])
    assert validate.main(["--out", str(tmp_path / "r")]) == 1
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    failed = [c for c in doc["claims"] if not c["passed"]]
    assert len(doc["claims"]) == 3 and len(failed) == 1
    assert failed[0]["name"] == "claims_convergence.run_claims"
    assert "RuntimeError: inner solver diverged" in failed[0]["detail"]
    assert failed[0]["measured"] is None and failed[0]["bound"] is None  # NaN → null
    assert "FAILED: claims_convergence.run_claims" in capsys.readouterr().out


def test_malformed_series_fails_the_claim(install, tmp_path):
    bad = Claim("w", "p", 0.0, 1.0, True, "d",
                {"kind": "weights", "iters": [0], "weights": [[1.0]], "optimum": [0.5, 0.5],
                 "names": ["a", "b"]})
    install(claims_bias=lambda: [_bias()], claims_convergence=lambda: [_stationarity()],
            claims_weights=lambda: [bad])
    assert validate.main(["--out", str(tmp_path / "r")]) == 1
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "plot series rejected" in doc["claims"][2]["detail"]
    assert not (tmp_path / "r" / "weights.png").exists()


def test_unknown_series_kind_is_noted_not_failed(install, tmp_path):
    other = Claim("histogram_claim", "p", 0.0, 1.0, True, "d", {"kind": "histogram", "x": [1]})
    install(claims_bias=lambda: [other], claims_convergence=lambda: [], claims_weights=lambda: [])
    assert validate.main(["--out", str(tmp_path / "r")]) == 0
    assert "histogram_claim: series kind 'histogram' has no plot" in (
        tmp_path / "r" / "report.md").read_text()
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "report.md"}


def test_refuses_non_empty_dir_and_touches_nothing(install, tmp_path, capsys):
    calls = _all_pass(install)
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert validate.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    assert calls == []  # refused before any claim ran


def test_empty_existing_dir_is_accepted(install, tmp_path):
    _all_pass(install)
    out = tmp_path / "r"
    out.mkdir()
    assert validate.main(["--out", str(out)]) == 0
    assert (out / "report.json").exists()


def test_overwrite_replaces_report_files_and_keeps_others(install, tmp_path):
    _all_pass(install)
    out = tmp_path / "r"
    assert validate.main(["--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    # Second run: different numbers and no weights series, so the old weights.png is stale.
    install(claims_bias=lambda: [_bias(passed=False)], claims_convergence=lambda: [_stationarity()],
            claims_weights=lambda: [])
    assert validate.main(["--out", str(out), "--overwrite"]) == 1
    doc = json.loads((out / "report.json").read_text())
    assert [c["passed"] for c in doc["claims"]] == [False, True]
    assert not (out / "weights.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


@pytest.mark.parametrize("argv", [[], ["--out"], ["--out", "x", "--bogus"], ["--quick"]])
def test_usage_errors_exit_2(argv, install, tmp_path, monkeypatch):
    calls = _all_pass(install)
    monkeypatch.chdir(tmp_path)
    assert validate.main(argv) == 2
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_out_is_a_file_exits_2(install, tmp_path, capsys):
    _all_pass(install)
    target = tmp_path / "file"
    target.write_text("x")
    assert validate.main(["--out", str(target), "--overwrite"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_missing_claims_module_is_a_clear_error(install, tmp_path, monkeypatch, capsys):
    _all_pass(install)
    monkeypatch.setitem(sys.modules, "scalebio.theory.claims_weights", None)  # import → error
    monkeypatch.delattr(theory_pkg, "claims_weights")
    assert validate.main(["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cannot import the claims modules" in err and "claims_weights" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_dispatches_to_validate(install, tmp_path):
    _all_pass(install)
    assert cli.main(["validate", "--quick", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["quick"] is True


@pytest.mark.slow  # ~70 s wall on the shared 2-core dev box, above the ~40 s default-set budget
def test_real_quick_run_end_to_end(tmp_path):
    """The real claims modules, through the installed CLI module, as a user would run it."""
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "scalebio.cli", "validate", "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=E2E_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["quick"] is True and doc["claims"]
    assert all(c["passed"] for c in doc["claims"])
    assert all(set(c) == CLAIM_KEYS for c in doc["claims"])
    for png in doc["plots"]:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
