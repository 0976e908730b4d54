"""Run diagnostics: each check on hand-made trajectories with known answers, then one tiny
`scalebio reweight` run that stops early on stable weights and still writes every output."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import yaml

from scalebio.llm.cli import reweight_main
from scalebio.llm.config import BilevelArgs, ConfigError
from scalebio.llm.data.tokenizer import char_vocab
from scalebio.llm.loop import diagnostics as dg
from scalebio.llm.tasks.demo_data import write_demo_sources

NAMES = ("a", "b")
# The checks are sums and ratios of a few dozen float64 numbers: agreement to round-off.
EXACT = 1e-12


def _rows(n: int, gap=None, grad=None, weight=None, loss=None, norm=None) -> list[dict]:
    """n rows; each column a function of the step (defaults: a healthy, settled run)."""
    gap = gap or (lambda t: 0.1)
    grad = grad or (lambda t: (-1.0) ** t)  # zero-mean, alternating: SNR 0 over an even window
    weight = weight or (lambda t: 0.5)
    loss = loss or (lambda t: 3.0)
    norm = norm or (lambda t: 1.0)
    rows = []
    for t in range(n):
        r = {"step": t, "gap": gap(t), "grad_norm_lambda": norm(t), "val_loss": loss(t),
             "train_loss_w": loss(t), "train_loss_u": loss(t)}
        r.update({"weight/a": weight(t), "weight/b": 1 - weight(t)})
        r.update({"grad_lambda/a": grad(t), "grad_lambda/b": -grad(t)})
        rows.append(r)
    return rows


def test_negative_gap_fraction_reads_the_trailing_window():
    # 20 steps, default window = last 10; 3 of those negative, and all of the first 10 (outside)
    neg = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 19}
    rows = _rows(20, gap=lambda t: -0.1 if t in neg else 0.2)
    assert dg.window_size(20) == 10
    assert dg.negative_gap_fraction(rows) == pytest.approx(0.3, abs=EXACT)
    assert dg.negative_gap_fraction(rows, 20) == pytest.approx(13 / 20, abs=EXACT)
    d = dg.diagnose(rows, NAMES)
    assert d["negative_gap_fraction"] == pytest.approx(0.3, abs=EXACT)
    assert not d["checks"]["negative_gap"] and not d["trustworthy"]
    assert "(a) 30%" in d["verdict"] and "bilevel.inner_steps_u" in d["verdict"]
    assert "bilevel.lr_u" in d["verdict"]


def test_lambda_snr_is_mean_over_standard_error():
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sample std √2.5: SNR = 3 / √(2.5/5) = 3√2
    rows = _rows(10, grad=lambda t: vals[t - 5] if t >= 5 else 100.0)
    snr = dg.lambda_snr(rows, NAMES)  # window: steps 5..9
    assert snr["a"] == pytest.approx(3 * math.sqrt(2), abs=EXACT)
    # a second implementation: the standard library's mean and stdev
    ref = statistics.mean(vals) / (statistics.stdev(vals) / math.sqrt(len(vals)))
    assert snr["a"] == pytest.approx(ref, abs=EXACT)
    assert snr["b"] == pytest.approx(-ref, abs=EXACT)  # b's component is a's negated
    assert dg.snr([0.0, 0.0, 0.0]) == 0.0
    assert dg.snr([2.0, 2.0]) == math.inf and math.isnan(dg.snr([1.0]))
    d = dg.diagnose(rows, NAMES)
    assert not d["checks"]["lambda_grad_snr"]  # 4.24 ≥ 3: still a consistent push
    assert "(b)" in d["verdict"] and "4.24" in d["verdict"]


def test_weight_stability_and_the_stop_rule_fire_at_the_right_step():
    # π moves by 0.05 per step until step 9, then wobbles by 5e-5 (≤ 1e-4) from step 10 on
    rows = _rows(30, weight=lambda t: 0.1 + 0.05 * t if t < 10 else 0.65 + 5e-5 * (t % 2))
    assert dg.weight_change(rows, NAMES, 5) == pytest.approx(5e-5, abs=EXACT)
    # steps 7..11: from 0.45 up to 0.65005
    assert dg.weight_change(rows[:12], NAMES, 5) == pytest.approx(0.20005, abs=EXACT)
    fired = next(t for t in range(len(rows)) if dg.is_stable(rows[: t + 1], NAMES, 5, 1e-4))
    assert fired == 14  # the first full window inside the settled part: steps 10..14
    assert not dg.is_stable(rows[:4], NAMES, 5, 1.0)  # never before a full window
    assert dg.stop_window(100, None) == 50 and dg.stop_window(100, 7) == 7
    d = dg.diagnose(rows[:15], NAMES, window=5, tol=1e-4, stopped_at=14)
    assert d["checks"]["weights_stable"] and d["stopped_when_stable_at"] == 14
    assert d["trustworthy"] and d["verdict"].startswith("Verdict: trustworthy")
    assert "stopped early at step 14" in d["verdict"]
    moving = dg.diagnose(rows[:10], NAMES)  # steps 5..9: π moved by 0.2
    assert moving["weight_change"] == pytest.approx(0.2, abs=EXACT)
    assert not moving["checks"]["weights_stable"] and "(c)" in moving["verdict"]


def test_zero_lambda_gradient_run_counts_only_the_window():
    start = _rows(20, norm=lambda t: 0.0 if t < 8 else 1.0)  # zeros at the start only
    assert dg.zero_gradient_run(start) == 0 and dg.diagnose(start, NAMES)["trustworthy"]
    stuck = _rows(20, norm=lambda t: 0.0 if 12 <= t < 18 else 1.0)
    assert dg.zero_gradient_run(stuck) == 6
    d = dg.diagnose(stuck, NAMES)
    assert not d["checks"]["lambda_gradient_nonzero"] and "bilevel.alpha" in d["verdict"]


def test_exploding_losses():
    rows = _rows(10, loss=lambda t: 5.0 if t < 5 else 5.0 + t)  # up to 14 / 5 = 2.8
    assert dg.loss_growth(rows) == pytest.approx(14 / 5, abs=EXACT)
    d = dg.diagnose(rows, NAMES)
    assert not d["checks"]["losses_bounded"] and "(e) the losses grew to 2.8×" in d["verdict"]
    nan = _rows(10, loss=lambda t: math.nan if t == 9 else 3.0)
    d = dg.diagnose(nan, NAMES)
    assert d["loss_growth"] is None and not d["checks"]["losses_bounded"]
    json.dumps(d, allow_nan=False)  # the document stays strict JSON


def test_healthy_trajectory_is_trustworthy_and_config_fields_are_checked():
    d = dg.diagnose(_rows(20), NAMES)
    assert d["trustworthy"] and d["lambda_grad_snr"] == {"a": 0.0, "b": 0.0}
    json.dumps(d, allow_nan=False)
    with pytest.raises(ConfigError, match="bilevel.stop_when_stable"):
        BilevelArgs(stop_when_stable=-1.0)
    with pytest.raises(ConfigError, match="bilevel.diagnostics_window"):
        BilevelArgs(diagnostics_window=1)


TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "vocab_size": len(char_vocab()), "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2}


def test_reweight_writes_diagnostics_and_stops_when_stable(tmp_path, capsys):
    src = write_demo_sources(tmp_path / "data", seed=3, n_train_per_source=40, n_val=16,
                             corruption_rates=(0.5, 1.0), off_target=("prose",))
    raw = {
        "model": {"config": TINY, "tokenizer": "char"},
        "data": {"sources": src["sources"], "validation": [src["val"]], "max_length": 48,
                 "per_source": 4, "val_batch": 8, "micro_batches": 1,
                 "cache_dir": str(tmp_path / "cache")},
        # tolerance 1: any change is "stable", so the rule fires at the first full window
        "bilevel": {"steps": 10, "lr_u": 1e-2, "lr_w": 1e-2, "lr_lambda": 0.1,
                    "diagnostics_window": 3, "stop_when_stable": 1.0},
        "run": {"seed": 1, "tracker": "none", "threads": 1},
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert reweight_main(["--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "weights.json").read_text())
    d = doc["diagnostics"]
    assert doc["steps"] == 3 and d["stopped_when_stable_at"] == 2 and d["window"] == 3
    assert d["verdict"] in capsys.readouterr().out
    assert (out / "diagnostics.png").stat().st_size > 0
    with open(out / "trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    names = [s["name"] for s in src["sources"]]
    for r in rows:  # the per-source components against the step's own norm of θ.grad
        norm = math.sqrt(sum(float(r[f"grad_lambda/{n}"]) ** 2 for n in names))
        # float32 gradient, printed to 9 digits: agreement to float32 round-off
        assert norm == pytest.approx(float(r["grad_norm_lambda"]), rel=1e-6, abs=1e-12)
    assert float(rows[0]["grad_norm_lambda"]) == 0.0  # u = w at step 0
    assert float(rows[2]["grad_norm_lambda"]) > 0.0  # so the check above is not all zeros
