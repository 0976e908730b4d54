"""The quadratic toy's closed forms against autograd / IFT / finite differences."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from scalebio.theory.hypergrad import (
    exact_hypergradient,
    penalty_hypergradient,
    penalty_value,
    solve_lower,
    solve_penalized,
)
from scalebio.toy_problems.quadratic import grad_y_upper_norm, make_quadratic

FD_EPS = 1e-4  # central differences in float64: error O(h²) + O(ε/h) ≈ 1e-8 at h = 1e-4
FD_ATOL = 1e-7  # O(eps²)·|Φ'''| = 0 for a quadratic, plus rounding ~1e-16/eps ≈ 1e-12
NOISE_SAMPLES = 1000
NOISE_SIGMAS = 5.0  # Monte-Carlo checks pass within 5 standard errors (false alarm ~6e-7)


@pytest.fixture(scope="module", params=[(1.0, 10.0), (0.1, 10.0)], ids=["kappa10", "kappa100"])
def toy(request):
    mu, L = request.param
    return make_quadratic(4, 7, mu, L, seed=3)


def test_lower_spectrum_is_exactly_mu_to_L(toy):
    eigs = torch.linalg.eigvalsh(toy.A)
    assert_close(eigs.min(), torch.tensor(toy.constants["mu"], dtype=torch.float64))
    assert_close(eigs.max(), torch.tensor(toy.constants["L"], dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(toy.P).min()) > -1e-12  # P ⪰ 0 up to rounding


def test_y_star_matches_newton(toy):
    assert_close(toy.y_star(toy.x0), solve_lower(toy.problem, toy.x0, toy.y0))


def test_grad_phi_matches_ift_dense_and_cg(toy):
    y_star = toy.y_star(toy.x0)
    assert_close(toy.grad_phi(toy.x0), exact_hypergradient(toy.problem, toy.x0, y_star))
    assert_close(toy.grad_phi(toy.x0),
                 exact_hypergradient(toy.problem, toy.x0, y_star, solve="cg"))


def test_grad_phi_matches_finite_differences(toy):
    basis = torch.eye(toy.x0.numel(), dtype=torch.float64)
    fd = torch.stack([(toy.phi(toy.x0 + FD_EPS * e) - toy.phi(toy.x0 - FD_EPS * e)) / (2 * FD_EPS)
                      for e in basis])
    assert_close(fd, toy.grad_phi(toy.x0), rtol=0, atol=FD_ATOL)


def test_hess_phi_and_L_phi_match_autograd(toy):
    hess = torch.autograd.functional.hessian(toy.phi, toy.x0)
    assert_close(hess, toy.hess_phi)
    assert_close(torch.linalg.eigvalsh(hess).max().item(), toy.constants["L_phi"])


def test_phi_min_is_a_stationary_minimum(toy):
    assert_close(toy.grad_phi(toy.x_min), torch.zeros_like(toy.x_min), rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = toy.x_min + torch.randn(toy.x_min.shape, generator=gen, dtype=torch.float64)
        assert float(toy.phi(x)) >= toy.phi_min


@pytest.mark.parametrize("alpha", [0.5, 10.0, 1e4])
def test_penalty_closed_forms_match_solvers(toy, alpha):
    y_alpha = solve_penalized(toy.problem, toy.x0, alpha, toy.y0)
    assert_close(toy.y_alpha(toy.x0, alpha), y_alpha)
    assert_close(toy.grad_penalty(toy.x0, alpha),
                 penalty_hypergradient(toy.problem, toy.x0, alpha, toy.y0))
    value = penalty_value(toy.problem, toy.x0, alpha, y_alpha, toy.y_star(toy.x0))
    assert_close(toy.penalty_value(toy.x0, alpha), value)


def test_penalty_value_gradient_is_grad_penalty(toy):
    """∇Ψ*_α is the gradient of the value function Ψ*_α (Danskin), checked by central FD."""
    alpha = 20.0
    basis = torch.eye(toy.x0.numel(), dtype=torch.float64)
    fd = torch.stack([(toy.penalty_value(toy.x0 + FD_EPS * e, alpha)
                       - toy.penalty_value(toy.x0 - FD_EPS * e, alpha)) / (2 * FD_EPS)
                      for e in basis])
    assert_close(fd, toy.grad_penalty(toy.x0, alpha), rtol=0, atol=FD_ATOL)


def test_constants_are_the_matrix_norms(toy):
    k = toy.constants
    assert_close(k["l_g1"], torch.linalg.matrix_norm(toy.B, ord=2).item())
    assert_close(k["l_f1"], 1.0)  # P is scaled to unit spectral norm
    assert_close(k["kappa"], k["L"] / k["mu"])
    r = toy.P @ (toy.y_star(toy.x0) - toy.c)
    assert_close(grad_y_upper_norm(toy, toy.x0), r.norm().item())


def test_seeded_and_deterministic():
    a, b = make_quadratic(3, 5, 0.5, 5.0, seed=7), make_quadratic(3, 5, 0.5, 5.0, seed=7)
    c = make_quadratic(3, 5, 0.5, 5.0, seed=8)
    for name in ("A", "B", "b", "P", "c", "x0"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.A, c.A)


def test_float32_dtype_is_respected():
    toy = make_quadratic(3, 5, 1.0, 4.0, seed=0, dtype=torch.float32)
    assert toy.A.dtype == toy.x0.dtype == toy.grad_phi(toy.x0).dtype == torch.float32


def _grad_y(fn, y):
    yl = y.clone().requires_grad_(True)
    return torch.autograd.grad(fn(yl), yl)[0]


@pytest.mark.parametrize("level", ["upper", "lower"])
def test_stochastic_variant_is_unbiased_with_known_variance(level):
    toy = make_quadratic(3, 6, 1.0, 4.0, seed=1, sigma=0.3)
    gen = torch.Generator().manual_seed(11)
    y = torch.randn(6, generator=gen, dtype=torch.float64)
    fn = toy.problem.upper if level == "upper" else toy.problem.combine
    exact = _grad_y(lambda yy: fn(toy.x0, yy, None), y)
    batches = [toy.sample_batch(gen) for _ in range(NOISE_SAMPLES)]
    dev = torch.stack([_grad_y(lambda yy, b=b: fn(toy.x0, yy, b), y) for b in batches]) - exact
    # Unbiased: each coordinate's mean within NOISE_SIGMAS standard errors σ/√n of 0.
    assert float(dev.mean(0).abs().max()) <= NOISE_SIGMAS * 0.3 / NOISE_SAMPLES**0.5
    # E‖ξ‖² = σ² d; ‖ξ‖²/σ² ~ χ²_d has standard deviation √(2d).
    sq = (dev * dev).sum(1)
    se = (0.3**2) * (2 * 6) ** 0.5 / NOISE_SAMPLES**0.5
    assert abs(float(sq.mean()) - toy.constants["noise_var"]) <= NOISE_SIGMAS * se


@pytest.mark.parametrize(
    "kwargs, field",
    [({"mu": 0.0}, "mu"), ({"mu": 2.0, "L": 1.0}, "mu"), ({"dim_x": 0}, "dim_x"),
     ({"dim_y": 1}, "dim_y"), ({"sigma": -1.0}, "sigma"), ({"rho": -0.1}, "rho")],
)
def test_bad_arguments_are_named(kwargs, field):
    args = {"dim_x": 2, "dim_y": 3, "mu": 1.0, "L": 2.0, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=field):
        make_quadratic(**args)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf")])
def test_bad_alpha_is_named(toy, alpha):
    with pytest.raises(ValueError, match="alpha"):
        toy.y_alpha(toy.x0, alpha)
