"""``scalebio validate [--quick] --out DIR [--overwrite]``: run every claim, write a report.

The claims live in three modules, each exposing ``run_claims(quick: bool = True) -> list[Claim]``:
``claims_bias`` (penalty bias vs α), ``claims_convergence`` (stationarity rates) and
``claims_weights`` (learned weights vs the optimum). They are imported explicitly, below.

DIR receives ``report.json``, ``report.md`` and one PNG per plot kind (``scalebio.theory.plots``).
Everything is first written to a temporary folder next to DIR, then moved in with ``os.rename`` /
``os.replace``, so an interrupted run leaves no half-written report. A non-empty DIR is refused
unless ``--overwrite``; then only the report's own files are replaced (others are left alone, and
report files of an earlier run that this run did not produce are removed).

Exit status: 0 every claim passed; 1 some claim failed (a ``run_claims`` that raises counts as a
failed claim carrying the exception text); 2 usage or set-up error (bad arguments, refused DIR, a
claims module that cannot be imported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from types import ModuleType

from tqdm.auto import tqdm

from .plots import PLOT_FILES, REQUIRED_FIELDS, check_series, write_plots
from .report import Claim

REPORT_FILES = (*PLOT_FILES.values(), "report.md", "report.json")  # report.json moved in last
CLAIM_MODULES = "claims_bias, claims_convergence, claims_weights (in scalebio.theory)"
PLOT_TITLES = {
    "stationarity": "Stationarity vs iterations (dashed: bound)",
    "bias_vs_alpha": "Hypergradient bias vs penalty α (dashed: bound)",
    "weights": "Weight trajectories (dashed: optimum)",
}


def load_claim_modules() -> tuple[ModuleType, ...]:
    """Import the three claims modules; ImportError (naming the module) when one is missing."""
    from . import claims_bias, claims_convergence, claims_weights

    return (claims_bias, claims_convergence, claims_weights)


def _short(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def _failed(module: ModuleType, error: BaseException) -> Claim:
    return Claim(
        name=f"{_short(module)}.run_claims",
        problem="(none: raised before returning claims)",
        measured=math.nan,
        bound=math.nan,
        passed=False,
        detail=f"run_claims raised {type(error).__name__}: {error}",
    )


def _checked(claim: Claim, notes: list[str]) -> Claim:
    """Fail a claim whose plot series is malformed; note (but keep) series of unknown kinds."""
    series = claim.series
    if not isinstance(series, dict):
        reason = f"not a dict but {type(series).__name__}"
    elif not series:
        return claim
    elif series.get("kind") not in REQUIRED_FIELDS:
        notes.append(f"{claim.name}: series kind {series.get('kind')!r} has no plot; not plotted")
        return claim
    else:
        try:
            check_series(series)
            return claim
        except (ValueError, TypeError) as e:
            reason = str(e)
    return dataclasses.replace(
        claim, passed=False, series={}, detail=f"{claim.detail} [plot series rejected: {reason}]"
    )


def run_all(modules: tuple[ModuleType, ...], quick: bool) -> tuple[list[Claim], list[str]]:
    """Run ``run_claims(quick=quick)`` of each module; exceptions become failed claims.

    Returns:
      (claims in module order, notes about series that could not be plotted).
    """
    claims: list[Claim] = []
    notes: list[str] = []
    for module in tqdm(modules, desc="claims", unit="module"):
        try:
            got = list(module.run_claims(quick=quick))
            wrong = [type(c).__name__ for c in got if not isinstance(c, Claim)]
            if wrong:
                raise TypeError(f"run_claims returned {wrong[0]}, expected Claim")
        except Exception as e:  # a broken claim is a failed claim, not a crashed report
            traceback.print_exc(file=sys.stderr)
            got = [_failed(module, e)]
        claims.extend(_checked(c, notes) for c in got)
    return claims, notes


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no NaN/inf


def _versions() -> dict[str, str]:
    """Installed distribution versions (from package metadata, so nothing is imported here)."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("scalebio", "torch", "numpy", "scipy", "matplotlib"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def report_json(claims: list[Claim], quick: bool, seconds: float, plots: list[str]) -> dict:
    """The report.json document (claim fields as in ``Claim.to_json``; NaN/inf become null)."""
    rows = []
    for c in claims:
        row = c.to_json()
        row["measured"], row["bound"] = map(_finite_or_none, (row["measured"], row["bound"]))
        rows.append(row)
    return {"claims": rows, "quick": quick, "seconds": seconds, "versions": _versions(),
            "plots": plots}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def report_markdown(doc: dict, notes: list[str]) -> str:
    """report.md: summary line, claims table, details, then the plots as embedded images."""
    claims = doc["claims"]
    n_pass = sum(c["passed"] for c in claims)
    mode = "quick" if doc["quick"] else "full"
    lines = [
        "# scalebio validate",
        "",
        f"{len(claims)} claims, {n_pass} passed, {len(claims) - n_pass} failed "
        f"({mode} mode, {doc['seconds']:.1f} s).",
        "",
        "| claim | problem | measured | bound | result |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        lines.append(
            f"| {_cell(c['name'])} | {_cell(c['problem'])} | {_fmt(c['measured'])} | "
            f"{_fmt(c['bound'])} | {'pass' if c['passed'] else '**FAIL**'} |"
        )
    lines += ["", "## Details", ""]
    lines += [f"- **{_cell(c['name'])}** ({_cell(c['problem'])}): {c['detail']}" for c in claims]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if doc["plots"]:
        lines += ["", "## Plots"]
        for kind, file_name in PLOT_FILES.items():
            if file_name in doc["plots"]:
                lines += ["", f"### {PLOT_TITLES[kind]}", "", f"![{kind}]({file_name})"]
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    lines += ["", f"Versions: {versions}.", ""]
    return "\n".join(lines)


def summary_table(claims: list[Claim]) -> str:
    """A fixed-width table for stdout."""
    rows = [("claim", "problem", "measured", "bound", "result")]
    for c in claims:
        m, b = _finite_or_none(float(c.measured)), _finite_or_none(float(c.bound))
        rows.append((c.name, c.problem, _fmt(m), _fmt(b), "pass" if c.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _refusal(out: Path, overwrite: bool) -> str | None:
    if out.exists() and not out.is_dir():
        return f"--out: {out} exists and is not a directory"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return f"--out: {out} is not empty; pass --overwrite to replace the report in it"
    return None


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished report from tmp into out (atomic per file; whole-folder if out is new)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    for name in REPORT_FILES:
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
        elif (out / name).exists():  # a stale plot from an earlier report
            (out / name).unlink()
    tmp.rmdir()


def write_report(out: Path, claims: list[Claim], notes: list[str], quick: bool,
                 seconds: float) -> dict:
    """Write report.json, report.md and the plots into ``out`` atomically; return the JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        panels: dict[str, list] = {}
        for c in claims:
            if c.series.get("kind") in PLOT_FILES:
                panels.setdefault(c.series["kind"], []).append((c.name, c.problem, c.series))
        plots = write_plots(panels, tmp)
        doc = report_json(claims, quick, seconds, plots)
        (tmp / "report.md").write_text(report_markdown(doc, notes), encoding="utf-8")
        (tmp / "report.json").write_text(
            json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return doc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scalebio validate",
        description="Check every theoretical claim on the toy problems and write a report.",
    )
    p.add_argument("--quick", action="store_true", help="smaller problems and fewer iterations")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="folder for report.json, report.md and the PNG plots")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the report files in a non-empty DIR (other files are kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scalebio validate``; returns the exit status (0 pass, 1 fail, 2 usage)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage and 0 on --help
        return e.code if isinstance(e.code, int) else 2
    out = args.out.resolve()
    refusal = _refusal(out, args.overwrite)
    if refusal:
        print(f"scalebio validate: {refusal}", file=sys.stderr)
        return 2
    try:
        modules = load_claim_modules()
    except ImportError as e:
        print(f"scalebio validate: cannot import the claims modules {CLAIM_MODULES}: {e}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    claims, notes = run_all(modules, args.quick)
    seconds = time.perf_counter() - start
    write_report(out, claims, notes, args.quick, seconds)
    print(summary_table(claims))
    failed = [c for c in claims if not c.passed]
    print(f"\n{len(claims) - len(failed)}/{len(claims)} claims passed in {seconds:.1f} s; "
          f"report in {out}")
    if not claims:
        print("FAILED: no claims ran", file=sys.stderr)
        return 1
    for c in failed:
        print(f"FAILED: {c.name} [{c.problem}]: {c.detail}")
    return 1 if failed else 0
