"""The inexact-descent stationarity bound, and the convergence claims on ScaleBiO runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from scalebio.theory import claims_convergence
from scalebio.theory.bounds import inexact_descent_bound
from scalebio.toy_problems.quadratic import make_quadratic


def test_inexact_descent_bound_formula():
    assert_close(inexact_descent_bound(4, 0.5, 1.0, 0.2), math.sqrt(2 * 1.0 / (0.5 * 4) + 0.05))
    # A decrease that rounding made slightly negative cannot produce a NaN.
    assert inexact_descent_bound(10, 1.0, -1e-18, 0.0) == 0.0


@pytest.mark.parametrize("error_size", [0.0, 0.05, 0.5])
def test_inexact_descent_bound_holds_for_perturbed_gradient_descent(error_size):
    """x_{s+1} = x_s − η(∇Φ(x_s) + e_s) with η = 1/L_Φ and seeded errors e_s of fixed size."""
    toy = make_quadratic(4, 6, 0.5, 5.0, seed=6)
    eta = 1.0 / toy.constants["L_phi"]
    gen = torch.Generator().manual_seed(12)
    x, phi0 = toy.x0.clone(), float(toy.phi(toy.x0))
    running_min, err_sq = math.inf, 0.0
    for t in range(1, 201):
        e = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        e = error_size * e / e.norm()
        grad = toy.grad_phi(x)
        running_min = min(running_min, float(grad.norm()))
        err_sq += float(e @ e)
        x = x - eta * (grad + e)
        assert running_min <= inexact_descent_bound(t, eta, phi0 - float(toy.phi(x)), err_sq)


def test_inexact_descent_bound_has_teeth_beyond_its_step_size_condition():
    """With η = 2.5/L_Φ (outside η ≤ 1/L_Φ) exact gradient descent diverges and the bound fails."""
    toy = make_quadratic(4, 6, 0.5, 5.0, seed=6)
    eta = 2.5 / toy.constants["L_phi"]
    x, phi0, running_min = toy.x0.clone(), float(toy.phi(toy.x0)), math.inf
    violated = False
    for t in range(1, 51):
        grad = toy.grad_phi(x)
        running_min = min(running_min, float(grad.norm()))
        x = x - eta * grad
        violated |= running_min > inexact_descent_bound(t, eta, phi0 - float(toy.phi(x)), 0.0)
    assert violated


@pytest.mark.parametrize(
    "args, field",
    [((0, 1.0, 1.0, 0.0), "t"), ((3, 0.0, 1.0, 0.0), "eta"), ((3, 1.0, 1.0, -1.0), "err_sq_sum")],
)
def test_bad_arguments_are_named(args, field):
    with pytest.raises(ValueError, match=field):
        inexact_descent_bound(*args)


def test_recorded_iterations_are_log_spaced_and_end_at_the_last_step():
    ts = claims_convergence._recorded(400)
    assert ts[0] == 1 and ts[-1] == 400 and ts == sorted(set(ts))
    assert len(ts) <= claims_convergence.NUM_RECORDED


@pytest.fixture(scope="module")
def quick_claims():
    return claims_convergence.run_claims(quick=True)


def test_quick_convergence_claims_all_pass(quick_claims):
    assert len(quick_claims) == 2
    failed = [(c.name, c.problem, c.measured) for c in quick_claims if not c.passed]
    assert not failed


def test_stationarity_series_have_the_plot_format(quick_claims):
    for claim in quick_claims:
        s = claim.series
        assert s["kind"] == "stationarity"
        assert len(s["iters"]) == len(s["grad_norm"]) == len(s["bound"])
        assert all(g <= b for g, b in zip(s["grad_norm"], s["bound"]))
        # A running minimum never increases, and it must have decreased over the run.
        assert all(a >= b for a, b in zip(s["grad_norm"], s["grad_norm"][1:]))
        assert s["grad_norm"][-1] < s["grad_norm"][0]
        assert math.isfinite(s["slope"]) and s["slope"] < 0
