"""`scalebio agree`: per-source spreads by hand, Spearman's rho and Kendall's W against scipy and
closed forms, every refusal (exit 2 naming the folder), and the mean weights read by `mix`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from scalebio.cli import main as cli_main
from scalebio.llm.pipeline.agree import (
    AgreeError,
    agree,
    average_ranks,
    kendall_w,
    read_runs,
    spearman,
)

# Sums of a handful of float64 numbers: a few ulps of 1 (the hand values are exact decimals,
# off by the binary rounding of 0.1 and friends).
HAND_TOL = 1e-12
# Two float64 implementations of the same rank formula: they differ only in summation order.
SCIPY_TOL = 1e-12

NAMES = ["a", "b", "c", "d"]
FINAL = [[0.4, 0.3, 0.2, 0.1],  # s0
         [0.5, 0.2, 0.2, 0.1],  # s1: b and c tie
         [0.3, 0.4, 0.2, 0.1]]  # s2: b above a
UNIFORM = [0.25] * 4


def _write_run(folder: Path, final, averaged=None, names=NAMES, config=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"weights": dict(zip(names, final)),
           "averaged_weights": dict(zip(names, averaged or final)), "names": list(names)}
    if config is not None:
        doc["config"] = config
    (folder / "weights.json").write_text(json.dumps(doc))
    return folder


def _three_runs(tmp_path: Path, averaged=UNIFORM, config=None) -> list[Path]:
    return [_write_run(tmp_path / f"s{i}", f, averaged, config=config)
            for i, f in enumerate(FINAL)]


# ---------------------------------------------------------------- statistics


def test_average_ranks_match_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = np.round(rng.random(7), 1)  # one decimal: ties are likely
        np.testing.assert_array_equal(average_ranks(v), stats.rankdata(v))


def test_spearman_matches_scipy_and_closed_forms():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = np.round(rng.random(6), 1), np.round(rng.random(6), 1)
        if len(set(a)) > 1 and len(set(b)) > 1:
            assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic,
                                                   abs=SCIPY_TOL)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0, abs=HAND_TOL)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=HAND_TOL)
    assert spearman([1, 2, 3], [5, 5, 5]) is None  # undefined: one run ties every source


def test_kendall_w_matches_friedman_statistic():
    # Friedman's chi-square (scipy, tie-corrected) is m(n - 1)·W: an independent implementation
    rng = np.random.default_rng(2)
    for m, n in [(2, 3), (3, 4), (5, 6), (4, 3)]:
        x = np.round(rng.random((m, n)), 1)
        chi2 = stats.friedmanchisquare(*x.T).statistic
        assert kendall_w(x) == pytest.approx(chi2 / (m * (n - 1)), abs=SCIPY_TOL)


def test_kendall_w_closed_forms():
    rng = np.random.default_rng(3)
    x = rng.random((4, 6))  # continuous draws: no ties
    # without ties, the mean pairwise Spearman rho is (m·W − 1) / (m − 1)
    rhos = [spearman(x[i], x[j]) for i in range(4) for j in range(i + 1, 4)]
    assert np.mean(rhos) == pytest.approx((4 * kendall_w(x) - 1) / 3, abs=SCIPY_TOL)
    assert kendall_w(np.stack([x[0]] * 3)) == pytest.approx(1.0, abs=HAND_TOL)
    assert kendall_w(np.stack([x[0], -x[0]])) == pytest.approx(0.0, abs=HAND_TOL)  # reversed
    assert kendall_w(np.full((3, 4), 0.25)) is None
    assert kendall_w(np.ones((3, 1))) is None


# ---------------------------------------------------------------- the report


def test_agree_known_answers(tmp_path):
    runs = _three_runs(tmp_path)
    doc = agree(runs, tmp_path / "agree")
    per = doc["final"]["per_source"]
    # means and sample stds by hand: a = .4,.5,.3 and b = .3,.2,.4 have std 0.1; c, d constant
    for name, mean, std, lo, hi in [("a", 0.4, 0.1, 0.3, 0.5), ("b", 0.3, 0.1, 0.2, 0.4),
                                    ("c", 0.2, 0.0, 0.2, 0.2), ("d", 0.1, 0.0, 0.1, 0.1)]:
        got = per[name]
        assert (got["mean"], got["std"], got["min"], got["max"]) == pytest.approx(
            (mean, std, lo, hi), abs=HAND_TOL)
    pairs = {(p["a"], p["b"]): p["rho"] for p in doc["final"]["spearman"]["pairs"]}
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        want = stats.spearmanr(FINAL[i], FINAL[j]).statistic
        assert pairs[(str(runs[i]), str(runs[j]))] == pytest.approx(want, abs=SCIPY_TOL)
    chi2 = stats.friedmanchisquare(*np.array(FINAL).T).statistic
    assert doc["final"]["kendall_w"] == pytest.approx(chi2 / (3 * 3), abs=SCIPY_TOL)
    top = doc["final"]["top"]
    assert not top["same_in_every_run"] and top["source"] is None
    assert top["per_run"] == {str(runs[0]): ["a"], str(runs[1]): ["a"], str(runs[2]): ["b"]}
    # averaged weights uniform in every run: ranks undefined, every source tied on top
    assert doc["averaged"]["kendall_w"] is None
    assert doc["averaged"]["spearman"]["mean"] is None
    assert "not the same in every run" in doc["summary"] and "caution" in doc["summary"]

    out = tmp_path / "agree"
    assert json.loads((out / "agreement.json").read_text()) == doc
    assert (out / "agreement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w = json.loads((out / "weights.json").read_text())
    assert list(w["weights"]) == NAMES
    assert list(w["weights"].values()) == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=HAND_TOL)
    assert math.fsum(w["weights"].values()) == pytest.approx(1.0, abs=HAND_TOL)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".weights")]  # no temp file


def test_agreeing_runs_say_so_and_reorder_sources(tmp_path):
    # same ordering in both runs, source order in the file differs: aligned by name
    r0 = _write_run(tmp_path / "r0", [0.5, 0.3, 0.2], names=["x", "y", "z"])
    r1 = _write_run(tmp_path / "r1", [0.15, 0.25, 0.6], names=["z", "y", "x"])
    doc = agree([r0, r1], tmp_path / "out")
    assert doc["final"]["per_source"]["x"]["values"] == [0.5, 0.6]
    assert doc["final"]["kendall_w"] == pytest.approx(1.0, abs=HAND_TOL)
    assert doc["final"]["top"]["source"] == "x"
    assert "agree strongly" in doc["summary"] and "use the mean weights" in doc["summary"]


# ---------------------------------------------------------------- refusals


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main(["agree", *map(str, argv)])
    return code, capsys.readouterr().err


def test_refusals_exit_2_naming_the_folder(tmp_path, capsys):
    good = _three_runs(tmp_path)
    out = tmp_path / "out"
    code, err = _cli(capsys, "--runs", good[0], "--out", out)
    assert code == 2 and "at least 2" in err

    missing = tmp_path / "missing"
    missing.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "weights.json").write_text("{not json")
    no_avg = tmp_path / "no_avg"
    no_avg.mkdir()
    (no_avg / "weights.json").write_text(json.dumps({"weights": dict(zip(NAMES, UNIFORM))}))
    other = _write_run(tmp_path / "other", [0.5, 0.5], names=["a", "e"])
    negative = _write_run(tmp_path / "negative", [0.5, 0.5, 0.5, -0.5])
    for bad, why in [(missing, "no weights.json"), (corrupt, "not valid JSON"),
                     (no_avg, "averaged_weights"), (other, "sources differ"),
                     (negative, ">= 0")]:
        code, err = _cli(capsys, "--runs", good[0], bad, "--out", out)
        assert code == 2 and str(bad) in err and why in err, err
    code, err = _cli(capsys, "--runs", good[0], good[1], tmp_path / "s0", "--out", out)
    assert code == 2 and "given twice" in err
    assert not out.exists()  # nothing written before the inputs are read


def test_out_folder_rules(tmp_path, capsys):
    runs = _three_runs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, err = _cli(capsys, "--runs", *runs, "--out", out)
    assert code == 2 and "not empty" in err and str(out) in err
    assert (out / "old.txt").exists()
    # --overwrite may not delete an input: the output folder holds run s0
    code, err = _cli(capsys, "--runs", *runs, "--out", tmp_path, "--overwrite")
    assert code == 2 and "delete inputs" in err
    code = cli_main(["agree", "--runs", *map(str, runs), "--out", str(out), "--overwrite"])
    printed = capsys.readouterr().out
    assert code == 0 and not (out / "old.txt").exists() and (out / "weights.json").is_file()
    assert "Kendall's W" in printed and "a " in printed


def test_read_runs_refuses_fewer_than_two(tmp_path):
    with pytest.raises(AgreeError, match="at least 2"):
        read_runs([])


# ---------------------------------------------------------------- mix reads the mean weights


def test_mix_accepts_mean_weights(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    entries = []
    for n in NAMES:
        rows = [{"messages": [{"role": "user", "content": f"{n} q{i}"},
                              {"role": "assistant", "content": f"{n} a{i}"}]} for i in range(30)]
        (data / f"{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # relative to the run folder, as mix reads a stored config: agree must make it absolute
        entries.append({"name": n, "path": f"../data/{n}.jsonl", "format": "messages"})
    runs = _three_runs(tmp_path, config={"data": {"sources": entries}})
    out = tmp_path / "runs" / "agree"  # another depth: relative paths would no longer resolve
    assert cli_main(["agree", "--runs", *map(str, runs), "--out", str(out)]) == 0
    mixed = tmp_path / "mixed"
    assert cli_main(["mix", "--weights", str(out / "weights.json"), "--num-examples", "20",
                     "--out", str(mixed), "--no-progress"]) == 0, capsys.readouterr().err
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert list(manifest["weights"].values()) == pytest.approx([0.4, 0.3, 0.2, 0.1],
                                                               abs=HAND_TOL)
    # Hamilton counts of 20 at 0.4/0.3/0.2/0.1 are exact quotas
    assert [s["taken"] for s in manifest["sources"]] == [8, 6, 4, 2]


def test_uniform_runs_have_no_ranking(tmp_path):
    runs = [_write_run(tmp_path / f"u{i}", UNIFORM) for i in range(2)]
    doc = agree(runs, tmp_path / "out")
    assert doc["final"]["kendall_w"] is None
    assert doc["final"]["per_source"]["a"]["std"] == 0.0
    assert "cannot be compared by rank" in doc["summary"]
    assert json.loads((tmp_path / "out" / "agreement.json").read_text())["final"][
        "kendall_w"] is None  # JSON null, not NaN


def test_config_differences_beyond_the_seed(tmp_path):
    def cfg(seed, alpha):
        return {"run": {"seed": seed}, "bilevel": {"alpha": alpha, "steps": 10}}

    same = [_write_run(tmp_path / f"p{i}", FINAL[i], config=cfg(i, 1.0)) for i in range(2)]
    assert agree(same, tmp_path / "o1")["config_differences"] == []
    other = _write_run(tmp_path / "q", FINAL[2], config=cfg(2, 5.0))
    doc = agree([*same, other], tmp_path / "o2")
    assert doc["config_differences"] == ["bilevel.alpha"]
    assert "compares set-ups" in doc["summary"]
