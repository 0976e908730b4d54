"""The O(1/α) penalty-bias bounds: exact identities, the bounds holding, and the claims."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from scalebio.theory import claims_bias
from scalebio.theory.bounds import (
    log_log_slope,
    penalty_bias_bound,
    penalty_bias_constant,
    quadratic_bias_constant,
    reweighting_smoothness,
)
from scalebio.toy_problems.logistic import make_logistic_reweighting
from scalebio.toy_problems.quadratic import grad_y_upper_norm, make_quadratic

FD_EPS = 1e-4  # central differences of ∇Φ for its Hessian: error O(h²) + O(ε/h) ≈ 1e-8


def _lemma_kwargs(constants: dict, l_f0: float) -> dict:
    keys = ("mu", "l_f1", "l_g1", "l_g2", "m_f", "l_fx1")
    return {k: constants[k] for k in keys} | {"l_f0": l_f0}


def test_quadratic_bias_closed_form_identity():
    """∇Ψ*_α − ∇Φ = −(1/α) Bᵀ(A + P/α)⁻¹ P A⁻¹ ∇_y f(x, y*) exactly."""
    toy = make_quadratic(4, 6, 0.5, 8.0, seed=2)
    x, alpha = toy.x0, 7.0
    grad_y_f = toy.P @ (toy.y_star(x) - toy.c)
    predicted = -toy.B.T @ torch.linalg.solve(
        toy.A + toy.P / alpha, toy.P @ torch.linalg.solve(toy.A, grad_y_f)) / alpha
    assert_close(toy.grad_penalty(x, alpha) - toy.grad_phi(x), predicted)


@settings(derandomize=True, deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), log_kappa=st.floats(0.0, 3.0),
       log_alpha=st.floats(-1.0, 6.0))
def test_quadratic_bounds_hold_and_are_ordered(seed, log_kappa, log_alpha):
    toy = make_quadratic(3, 5, 0.2, 0.2 * 10**log_kappa, seed=seed)
    alpha = 10**log_alpha
    error = float((toy.grad_penalty(toy.x0, alpha) - toy.grad_phi(toy.x0)).norm())
    grad_y_f = toy.P @ (toy.y_star(toy.x0) - toy.c)
    explicit = quadratic_bias_constant(toy.A, toy.B, toy.P, grad_y_f)
    lemma = penalty_bias_constant(
        alpha, **_lemma_kwargs(toy.constants, grad_y_upper_norm(toy, toy.x0)))
    # Relative slack 1e-9: at α = 1e6 the measured error carries ~1e-10 relative rounding.
    assert error <= explicit / alpha * (1 + 1e-9)
    assert explicit <= lemma * (1 + 1e-12)


@pytest.mark.parametrize("alpha", [1.0, 10.0, 1e3])
def test_general_lemma_holds_on_logistic_at_several_points(alpha):
    toy = make_logistic_reweighting(num_sources=3, dim=5, n_per_source=60, n_val=50, seed=1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = 2 * torch.randn(3, generator=gen, dtype=torch.float64)
        y_star = toy.y_star(x)
        grad_f = -((torch.sigmoid(-toy.val_labels * (toy.val_features @ y_star))
                    * toy.val_labels)[:, None] * toy.val_features).mean(0)
        error = float((toy.grad_penalty(x, alpha) - toy.grad_phi(x)).norm())
        assert error <= penalty_bias_bound(
            alpha, **_lemma_kwargs(toy.constants, float(grad_f.norm())))


def test_reweighting_smoothness_bounds_the_hessian_of_phi():
    toy = make_logistic_reweighting(num_sources=3, dim=5, n_per_source=60, n_val=50, seed=1)
    k = toy.constants
    l_phi = reweighting_smoothness(mu=k["mu"], c1=k["c1"], c2=k["c2"], c3=k["c3"],
                                   l_f0=k["l_f0"], l_f1=k["l_f1"])
    gen = torch.Generator().manual_seed(4)
    basis = torch.eye(3, dtype=torch.float64)
    for _ in range(4):
        x = 2 * torch.randn(3, generator=gen, dtype=torch.float64)
        hess = torch.stack([(toy.grad_phi(x + FD_EPS * e) - toy.grad_phi(x - FD_EPS * e))
                            / (2 * FD_EPS) for e in basis])
        hess = 0.5 * (hess + hess.T)
        assert float(torch.linalg.matrix_norm(hess, ord=2)) <= l_phi


def test_lemma_constant_formula():
    c = penalty_bias_constant(4.0, mu=2.0, l_f0=3.0, l_f1=1.0, l_g1=4.0, l_g2=0.5, m_f=1.0,
                              l_fx1=0.25)
    kappa, d = 2.0, 3.0 / (2.0 - 1.0 / 4.0)
    assert_close(c, (0.25 + kappa * 1.0) * d + 0.5 * 0.5 * (1 + kappa) * d * d)
    # Defaults m_f = l_fx1 = l_f1 (the general smooth, possibly non-convex f).
    assert_close(penalty_bias_constant(4.0, mu=2.0, l_f0=3.0, l_f1=1.0, l_g1=4.0, l_g2=0.5),
                 penalty_bias_constant(4.0, mu=2.0, l_f0=3.0, l_f1=1.0, l_g1=4.0, l_g2=0.5,
                                       m_f=1.0, l_fx1=1.0))


def test_log_log_slope_recovers_a_power_law():
    xs = [1.0, 10.0, 100.0, 1e3]
    assert_close(log_log_slope(xs, [3.0 * x**-1.5 for x in xs]), -1.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"alpha": 0.4}, "alpha"), ({"mu": 0.0}, "mu"), ({"l_f0": -1.0}, "l_f0"),
     ({"l_g2": math.nan}, "l_g2"), ({"alpha": -2.0}, "alpha")],
)
def test_bad_constants_are_named(kwargs, field):
    args = {"alpha": 10.0, "mu": 1.0, "l_f0": 1.0, "l_f1": 0.5, "l_g1": 1.0, "l_g2": 0.1} | kwargs
    with pytest.raises(ValueError, match=field):
        penalty_bias_constant(**args)


def test_bad_shapes_are_named():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="A, P"):
        quadratic_bias_constant(A, torch.ones(3, 2), torch.eye(2), torch.ones(3))
    with pytest.raises(ValueError, match="grad_y_f"):
        quadratic_bias_constant(A, torch.ones(3, 2), A, torch.ones(2))
    with pytest.raises(ValueError, match="xs, ys"):
        log_log_slope([1.0], [1.0])


@pytest.fixture(scope="module")
def quick_claims():
    return claims_bias.run_claims(quick=True)


def test_quick_bias_claims_all_pass(quick_claims):
    # 2 per toy (within bound, slope) × 3 toys, then the two two-timescale claims
    assert len(quick_claims) == 8
    assert [c.name for c in quick_claims[6:]] == [
        "two_timescale_tracking_falls_with_K", "two_timescale_limit_bias_O(1/alpha)"]
    failed = [(c.name, c.problem, c.measured) for c in quick_claims if not c.passed]
    assert not failed


def test_bias_series_have_the_plot_format(quick_claims):
    series = [c.series for c in quick_claims if c.series and c.name == "penalty_bias_within_bound"]
    assert len(series) == 3
    for s in series:
        assert s["kind"] == "bias_vs_alpha"
        assert len(s["alpha"]) == len(s["error"]) == len(s["bound"]) == 7
        assert all(e <= b for e, b in zip(s["error"], s["bound"]))
        assert claims_bias.SLOPE_BAND[0] <= s["slope"] <= claims_bias.SLOPE_BAND[1]
