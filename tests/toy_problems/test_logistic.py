"""The logistic reweighting toy: hand-written IFT hypergradient vs autograd, FD, constants."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from scalebio.simplex import weights
from scalebio.theory.hypergrad import (
    exact_hypergradient,
    lower_value,
    penalty_hypergradient,
    solve_lower,
    solve_penalized,
)
from scalebio.toy_problems.logistic import make_logistic_reweighting

FD_EPS = 1e-4  # central differences in float64: error O(h²) + O(ε/h) ≈ 1e-8 at h = 1e-4
FD_ATOL = 1e-7  # truncation O(eps²)·|Φ'''| ≈ 1e-9 here, rounding ~1e-16/eps ≈ 1e-12
NUM_PROBES = 6  # random (θ, y) points at which each smoothness constant is checked


@pytest.fixture(scope="module")
def toy():
    return make_logistic_reweighting(num_sources=3, dim=5, n_per_source=60, n_val=50, seed=2)


@pytest.fixture(scope="module")
def theta(toy):
    gen = torch.Generator().manual_seed(5)
    return torch.randn(toy.x0.shape, generator=gen, dtype=torch.float64)


def test_starts_uniform_and_noise_rates_default(toy):
    assert_close(weights(toy.x0, toy.spec), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert_close(toy.noise_rates, torch.tensor([0.0, 0.225, 0.45], dtype=torch.float64))
    assert toy.features.shape == (3, 60, 5) and toy.labels.shape == (3, 60)
    assert_close(toy.features.norm(dim=-1), torch.ones(3, 60, dtype=torch.float64))


def test_y_star_matches_generic_newton(toy, theta):
    y_star = toy.y_star(theta)
    assert_close(y_star, solve_lower(toy.problem, theta, toy.y0))
    # The generic lower objective is the toy's g: stationary at y*.
    yl = y_star.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(lower_value(toy.problem, theta, yl), yl)
    assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-14)


def test_grad_phi_matches_autograd_ift(toy, theta):
    y_star = toy.y_star(theta)
    assert_close(toy.grad_phi(theta), exact_hypergradient(toy.problem, theta, y_star))
    assert_close(toy.grad_phi(theta),
                 exact_hypergradient(toy.problem, theta, y_star, solve="cg"))


@pytest.mark.parametrize("point", ["uniform", "random"])
def test_grad_phi_matches_central_differences(toy, theta, point):
    x = toy.x0 if point == "uniform" else theta
    basis = torch.eye(x.numel(), dtype=torch.float64)
    fd = torch.stack([(toy.phi(x + FD_EPS * e) - toy.phi(x - FD_EPS * e)) / (2 * FD_EPS)
                      for e in basis])
    assert_close(fd, toy.grad_phi(x), rtol=0, atol=FD_ATOL)


def test_grad_phi_sums_to_zero(toy, theta):
    """Softmax is shift-invariant, so ∇_θΦ ⟂ 1 (a property of J(π), not of the data)."""
    assert_close(toy.grad_phi(theta).sum().item(), 0.0, rtol=0, atol=1e-15)


@pytest.mark.parametrize("alpha", [3.0, 100.0, 1e4])
def test_penalty_solutions_match_generic(toy, theta, alpha):
    y_alpha = toy.y_alpha(theta, alpha)
    assert_close(y_alpha, solve_penalized(toy.problem, theta, alpha, toy.y0))
    assert_close(toy.grad_penalty(theta, alpha),
                 penalty_hypergradient(toy.problem, theta, alpha, toy.y0))


def test_warm_start_reaches_the_same_solution(toy, theta):
    cold = toy.y_star(theta)
    warm = toy.y_star(theta, torch.full_like(cold, 3.0))
    assert_close(warm, cold)


def _per_source(toy, y):
    """Per-source mean losses without the ridge, as a function of y (for autograd)."""
    return torch.nn.functional.softplus(-toy.labels * (toy.features @ y)).mean(-1)


def test_smoothness_constants_hold_at_random_points(toy):
    """Each constant is a sup over y (and θ); it must bound the quantity at any probe."""
    k = toy.constants
    gen = torch.Generator().manual_seed(9)
    for _ in range(NUM_PROBES):
        y = 3 * torch.randn(5, generator=gen, dtype=torch.float64)
        x = torch.randn(3, generator=gen, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda yy: _per_source(toy, yy), y)  # (K, d)
        assert float(jac.norm(dim=1).max()) <= k["c1"]
        for j in range(3):
            hess = torch.autograd.functional.hessian(lambda yy, j=j: _per_source(toy, yy)[j], y)
            assert float(torch.linalg.matrix_norm(hess, ord=2)) <= k["c2"]
        val_hess = torch.autograd.functional.hessian(
            lambda yy: toy.problem.upper(toy.x0, yy, None), y)
        assert float(torch.linalg.matrix_norm(val_hess, ord=2)) <= k["l_f1"]
        # ∇²_{xy} g via autograd of the generic problem.
        cross = torch.autograd.functional.jacobian(
            lambda yy, x=x: torch.autograd.functional.jacobian(
                lambda xx: lower_value(toy.problem, xx, yy), x, create_graph=True), y)
        assert float(torch.linalg.matrix_norm(cross, ord=2)) <= k["l_g1"]


def test_third_derivative_constant_bounds_hessian_lipschitz(toy):
    """‖∇²L_k(y) − ∇²L_k(y')‖ ≤ c3 ‖y − y'‖ on random pairs."""
    gen = torch.Generator().manual_seed(10)
    for _ in range(NUM_PROBES):
        y, y2 = (2 * torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2))
        for j in range(3):
            h1, h2 = (torch.autograd.functional.hessian(
                lambda yy, j=j: _per_source(toy, yy)[j], v) for v in (y, y2))
            gap = float(torch.linalg.matrix_norm(h1 - h2, ord=2))
            assert gap <= toy.constants["c3"] * float((y - y2).norm())
    # Never worse than the crude sup|ℓ‴|·R³ (the data-dependent λ_max(S) ≤ R²).
    assert toy.constants["c3"] <= toy.constants["R"] ** 3 / (6 * math.sqrt(3))


def test_seeded_and_deterministic():
    a = make_logistic_reweighting(num_sources=2, dim=3, n_per_source=20, n_val=10, seed=4)
    b = make_logistic_reweighting(num_sources=2, dim=3, n_per_source=20, n_val=10, seed=4)
    c = make_logistic_reweighting(num_sources=2, dim=3, n_per_source=20, n_val=10, seed=5)
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.features, c.features)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"num_sources": 1}, "num_sources"), ({"reg": 0.0}, "reg"), ({"dim": 0}, "dim"),
     ({"noise_rates": [0.1, 0.2]}, "noise_rates"), ({"noise_rates": [0.1, 0.2, 0.3, 0.5]},
                                                    "noise_rates")],
)
def test_bad_arguments_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_logistic_reweighting(**kwargs)


def test_bad_alpha_is_named(toy, theta):
    with pytest.raises(ValueError, match="alpha"):
        toy.y_alpha(theta, 0.0)
