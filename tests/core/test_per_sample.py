"""Per-sample weights are the same mechanism as per-source weights, with K = n examples."""

from __future__ import annotations

import torch

import scalebio as sb


def test_per_example_weights_down_weight_a_corrupted_example():
    g = torch.Generator().manual_seed(0)
    n, d = 12, 3
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    beta = torch.randn(d, generator=g, dtype=torch.float64)
    b = a @ beta
    bad = 5
    b[bad] += 8.0  # one example with a grossly wrong target
    a_val = torch.randn(40, d, generator=g, dtype=torch.float64)
    b_val = a_val @ beta
    spec = sb.make_simplex(n)  # one weight per training example
    problem = sb.reweighting_problem(
        lambda w, batch: 0.5 * ((a_val @ w - b_val) ** 2).mean(),
        lambda w, batch: 0.5 * (a @ w - b) ** 2,  # the "per-source" losses are per-example
        spec,
    )
    cfg = sb.ScaleBiOConfig(alpha=10.0, opt_x=sb.sgd(2.0), opt_y=sb.sgd(0.02), opt_z=sb.sgd(0.02))
    res = sb.run(problem, sb.init_logits(spec, torch.float64), torch.zeros(d, dtype=torch.float64),
                 cfg, 1500, progress=False)
    w = res.weights
    assert int(w.argmin()) == bad
    assert float(w[bad]) < 0.5 / n  # at most half its uniform share
    assert abs(float(w.sum()) - 1) < 1e-12
