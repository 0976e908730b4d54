"""Mixture-recovery task (llm/tasks/recovery.py): the styles are disjoint and equal-length (so the
validation optimum is π° at the token level too), the validation file holds exactly the
apportioned counts, and the L1 curve matches a direct computation."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from scalebio.llm.tasks.recovery import (
    ANSWER_CHARS,
    STYLES,
    STYLES_TARGET,
    l1,
    l1_curve,
    mixture_counts,
    style_examples,
    write_styles_task,
)


def _style_of(answer: str) -> str:
    kinds = {"digits": str.isdigit, "lower": str.islower, "upper": str.isupper}
    found = [k for k, f in kinds.items() if f(answer)]
    return found[0] if found else "symbols"


def test_styles_share_prompts_and_differ_in_answers():
    rng = np.random.default_rng(0)
    first_chars = {}
    for style in STYLES:
        recs = style_examples(rng, 200, style)
        assert all(r["instruction"].startswith("What is ") for r in recs)
        assert all(len(r["output"]) == ANSWER_CHARS for r in recs)  # equal token counts
        assert {_style_of(r["output"]) for r in recs} == {style}
        first_chars[style] = {r["output"][0] for r in recs}
    for a in STYLES:  # disjoint first characters: a style is identified by its first token
        for b in STYLES:
            assert a == b or not first_chars[a] & first_chars[b]
    with pytest.raises(ValueError, match="style"):
        style_examples(rng, 1, "emoji")


@pytest.mark.parametrize("n", [1, 7, 200, 333])
def test_mixture_counts_apportion_exactly(n):
    counts = mixture_counts(STYLES_TARGET, n)
    assert sum(counts.values()) == n
    for k, v in counts.items():
        assert abs(v - STYLES_TARGET[k] * n) < 1  # each count within 1 of its quota


def test_validation_file_is_the_target_mixture(tmp_path):
    data = write_styles_task(tmp_path, seed=3, n_train=10, n_val=200)
    rows = [json.loads(x) for x in open(data["val"]["path"])]
    assert Counter(_style_of(r["output"]) for r in rows) == {"digits": 100, "lower": 60,
                                                             "symbols": 40}
    assert [s["name"] for s in data["sources"]] == list(STYLES)
    again = write_styles_task(tmp_path / "again", seed=3, n_train=10, n_val=200)
    assert open(again["val"]["path"]).read() == open(data["val"]["path"]).read()


def test_l1_curve_matches_direct_computation():
    names = ["a", "b"]
    target = {"a": 0.7, "b": 0.3}
    ws = [(0.5, 0.5), (0.6, 0.4), (0.9, 0.1), (0.7, 0.3)]
    rows = [{"weight/a": a, "weight/b": b} for a, b in ws]
    curve = l1_curve(rows, names, target, [2, 4, 9])  # 9 > len(rows): skipped
    assert [c["step"] for c in curve] == [2, 4]
    assert curve[0]["l1"] == pytest.approx(0.2)
    assert curve[0]["l1_averaged"] == pytest.approx(abs(0.55 - 0.7) + abs(0.45 - 0.3))
    assert curve[0]["l1_tail"] == pytest.approx(0.2)  # steps (1.5, 2]: step 2 alone
    assert curve[1]["l1"] == pytest.approx(0.0, abs=1e-12)
    assert curve[1]["l1_tail"] == pytest.approx(0.0, abs=1e-12)  # mean of rows 4: (0.7, 0.3)
    assert l1({"a": 0.5, "b": 0.5}, {"a": 1.0}) == pytest.approx(1.0)


# The documented recovery run (docs/results.md §3) for one seed: the learned weights end within
# L1 0.2 of π° (a third of uniform's 0.6; measured 0.035 for seed 0) and closer than at a quarter
# of the run. About 4 minutes on 2 cores, hence slow.
RECOVERY_L1 = 0.2


@pytest.mark.slow
def test_styles_mixture_is_recovered(tmp_path):
    from scalebio.llm.tasks.recovery import recovery_run

    bilevel = {"alpha": 1.0, "lambda_optimizer": "sgd", "lr_lambda": 1.0, "schedule": "cosine"}
    r = recovery_run(tmp_path / "r", "styles", 400, 0, bilevel=bilevel, n_val=4000,
                     progress=False)
    assert r["l1"] < RECOVERY_L1 < r["l1_uniform"]
    assert r["curve"][-1]["l1"] < r["curve"][0]["l1"]
    assert max(r["weights"], key=r["weights"].get) == "digits"
