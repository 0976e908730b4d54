"""The surrogate S carries the ScaleBiO directions: ∇_x S = ∇_x Ψ, ∇_y S = ∇_y Ψ, ∇_z S = −∇_z Ψ."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from scalebio import penalty_surrogate, weighted_sum


def _random_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    n, m = 3, 4
    a = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    x = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, y):  # upper depends on x too, to check the ∇_x f term
        return 0.5 * ((y - b) ** 2).sum() + 0.1 * (x**2).sum() * y.sum()

    def lower(x, h):  # g(x, y) = G(x, H(y)) with H = identity; nonlinear in both
        return 0.5 * ((h - a @ x) ** 2).sum() + torch.sin(x).sum() * (h**2).sum()

    return x, y, z, f, lower


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.5, 10.0, 1e4])
def test_surrogate_gradients_are_the_minimax_directions(seed, alpha):
    x, y, z, f, lower = _random_problem(seed)
    psi = f(x, y) + alpha * (lower(x, y) - lower(x, z))
    gx, gy, gz = torch.autograd.grad(psi, [x, y, z])
    terms = penalty_surrogate(x, f(x, y), y, z, lower, alpha)
    sx, sy, sz = torch.autograd.grad(terms.surrogate, [x, y, z])
    assert_close(sx, gx)  # x descends on Ψ
    assert_close(sy, gy)  # y descends on Ψ
    assert_close(sz, -gz)  # z ascends on Ψ
    assert_close(terms.psi, psi.detach())
    assert_close(terms.gap, (lower(x, y) - lower(x, z)).detach())
    assert_close(terms.surrogate.detach(), (f(x, y) + alpha * lower(x, y)).detach())


def test_reweighting_direction_matches_softmax_jacobian_formula():
    # g_θ,k = α π_k [Δ_k − Σ_j π_j Δ_j], Δ = ℓ̄(y) − ℓ̄(z)  (docs/method.md §3)
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    ly, lz = (
        torch.rand(5, generator=g, dtype=torch.float64),
        torch.rand(5, generator=g, dtype=torch.float64),
    )
    alpha = 7.0
    terms = penalty_surrogate(
        theta,
        torch.zeros((), dtype=torch.float64),
        ly,
        lz,
        lambda th, h: weighted_sum(torch.softmax(th, 0), h),
        alpha,
    )
    (gth,) = torch.autograd.grad(terms.surrogate, [theta])
    pi = torch.softmax(theta.detach(), 0)
    delta = ly - lz
    assert_close(gth, alpha * pi * (delta - (pi * delta).sum()))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_alpha_is_named(alpha):
    x, y, z, f, lower = _random_problem(0)
    with pytest.raises(ValueError, match="alpha"):
        penalty_surrogate(x, f(x, y), y, z, lower, alpha)


def test_non_finite_losses_are_named():
    x, y, z, f, lower = _random_problem(0)
    with pytest.raises(FloatingPointError, match="upper"):
        penalty_surrogate(x, f(x, y) * float("nan"), y, z, lower, 1.0)
    with pytest.raises(FloatingPointError, match=r"H\(z\)"):
        penalty_surrogate(x, f(x, y), y, z * float("inf"), lower, 1.0)


def test_mismatched_features_are_named():
    x, y, z, f, lower = _random_problem(0)
    with pytest.raises(ValueError, match="features_z"):
        penalty_surrogate(x, f(x, y), y, z[:2], lower, 1.0)
    with pytest.raises(ValueError, match="losses"):
        weighted_sum(torch.ones(3) / 3, torch.ones(4))
