"""Reference hypergradients on a non-quadratic problem: IFT vs finite differences, Danskin."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from scalebio.problem import generic_problem
from scalebio.solver import evaluate
from scalebio.theory.hypergrad import (
    exact_hypergradient,
    lower_value,
    penalty_hypergradient,
    penalty_value,
    solve_lower,
    solve_penalized,
)
from scalebio.toy_problems.quadratic import make_quadratic

FD_EPS = 1e-4  # central differences in float64: error O(h²) + O(ε/h) ≈ 1e-8 at h = 1e-4
FD_ATOL = 1e-7  # truncation O(eps²)·|Φ'''| ~ 1e-8 for these O(1) smooth problems, rounding ~1e-12
DECADE_RATIO = 0.2  # bias ratio per 10× α: 0.1 for an exact 1/α law, slack for the 1/α² term


def _nonquadratic(shape=(4,)):
    """g = ½‖y‖² + Σ log cosh(y − W x) + ⟨y, sin x⟩-type coupling; f nonlinear in x and y.

    g is 1-strongly convex in y (log cosh is convex) and couples x non-linearly; f depends on x
    directly, so all four terms of the IFT formula are exercised.
    """
    gen = torch.Generator().manual_seed(0)
    d = int(torch.tensor(shape).prod())
    W = torch.randn(d, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(shape, generator=gen, dtype=torch.float64)

    def lower(x, y, batch):
        shift = (W @ torch.sin(x)).reshape(shape)
        return 0.5 * (y * y).sum() + torch.log(torch.cosh(y - shift)).sum()

    def upper(x, y, batch):
        return 0.5 * ((y - target) ** 2).sum() + torch.cos(x).sum() * y.sum() * 0.1

    x = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    return generic_problem(upper, lower), x, torch.zeros(shape, dtype=torch.float64)


def _phi(problem, x, y0):
    return problem.upper(x, solve_lower(problem, x, y0), None)


def _fd(fn, x):
    basis = torch.eye(x.numel(), dtype=x.dtype)
    return torch.stack([(fn(x + FD_EPS * e) - fn(x - FD_EPS * e)) / (2 * FD_EPS) for e in basis])


@pytest.mark.parametrize("shape", [(4,), (2, 3)], ids=["vector", "matrix"])
@pytest.mark.parametrize("solve", ["dense", "cg"])
def test_ift_hypergradient_matches_finite_differences(shape, solve):
    problem, x, y0 = _nonquadratic(shape)
    y_star = solve_lower(problem, x, y0)
    grad = exact_hypergradient(problem, x, y_star, solve=solve)
    assert grad.shape == x.shape
    assert_close(grad, _fd(lambda xx: _phi(problem, xx, y0), x), rtol=0, atol=FD_ATOL)


def test_newton_reaches_machine_precision():
    problem, x, y0 = _nonquadratic()
    y_star = solve_lower(problem, x, y0)
    yl = y_star.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(lower_value(problem, x, yl), yl)
    assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-15)


@pytest.mark.parametrize("alpha", [2.0, 50.0])
def test_penalty_hypergradient_is_gradient_of_value_function(alpha):
    """Danskin: ∇Ψ*_α matches central differences of x ↦ f(x,y_α) + α[g(x,y_α) − g(x,y*)]."""
    problem, x, y0 = _nonquadratic()

    def psi_star(xx):
        y_star = solve_lower(problem, xx, y0)
        y_alpha = solve_penalized(problem, xx, alpha, y_star)
        return penalty_value(problem, xx, alpha, y_alpha, y_star)

    grad = penalty_hypergradient(problem, x, alpha, y0)
    assert_close(grad, _fd(psi_star, x), rtol=0, atol=FD_ATOL)


def test_penalty_hypergradient_is_the_solver_direction_at_exact_inner_optima():
    """With y = y_α and z = y*, ScaleBiO's d_x (scalebio.solver.evaluate) is ∇Ψ*_α."""
    problem, x, y0 = _nonquadratic()
    alpha = 10.0
    y_star = solve_lower(problem, x, y0)
    y_alpha = solve_penalized(problem, x, alpha, y_star)
    xl = x.clone().requires_grad_(True)
    terms = evaluate(problem, xl, y_alpha, y_star, None, alpha)
    (d_x,) = torch.autograd.grad(terms.surrogate, xl)
    assert_close(penalty_hypergradient(problem, x, alpha, y0), d_x)


def test_penalty_hypergradient_approaches_ift_hypergradient():
    problem, x, y0 = _nonquadratic()
    exact = exact_hypergradient(problem, x, solve_lower(problem, x, y0))
    errors = [float((penalty_hypergradient(problem, x, a, y0) - exact).norm())
              for a in (1e2, 1e3, 1e4)]
    assert errors[1] < DECADE_RATIO * errors[0] and errors[2] < DECADE_RATIO * errors[1]


def test_precomputed_solutions_are_used():
    problem, x, y0 = _nonquadratic()
    y_star = solve_lower(problem, x, y0)
    y_alpha = solve_penalized(problem, x, 5.0, y_star)
    assert_close(penalty_hypergradient(problem, x, 5.0, y0, y_alpha=y_alpha, y_star=y_star),
                 penalty_hypergradient(problem, x, 5.0, y0))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_alpha_is_named(alpha):
    problem, x, y0 = _nonquadratic()
    with pytest.raises(ValueError, match="alpha"):
        penalty_hypergradient(problem, x, alpha, y0)
    with pytest.raises(ValueError, match="alpha"):
        solve_penalized(problem, x, alpha, y0)


def test_bad_inputs_are_named():
    problem, x, y0 = _nonquadratic()
    with pytest.raises(ValueError, match="solve"):
        exact_hypergradient(problem, x, y0, solve="neumann")
    with pytest.raises(TypeError, match="x"):
        solve_lower(problem, [0.3, 0.1, 0.2], y0)
    with pytest.raises(ValueError, match="y0"):
        solve_lower(problem, x, torch.empty(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="y_star"):
        exact_hypergradient(problem, x, torch.full((4,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="y_alpha"):
        penalty_hypergradient(problem, x, 5.0, y0, y_alpha=torch.zeros(3, dtype=torch.float64))


def test_non_convex_objectives_are_refused():
    concave = generic_problem(lambda x, y, b: (y * y).sum(), lambda x, y, b: -(y * y).sum() + x @ y)
    x = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive definite"):
        solve_lower(concave, x, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="y_star"):
        exact_hypergradient(concave, x, torch.zeros(2, dtype=torch.float64))
    # f = −3‖y‖², g = ‖y‖²: f + αg is strongly convex only for α > 3.
    nonconvex_f = generic_problem(lambda x, y, b: -3 * (y * y).sum(),
                                  lambda x, y, b: (y * y).sum() - x @ y)
    with pytest.raises(ValueError, match="alpha"):
        solve_penalized(nonconvex_f, x, 2.0, torch.zeros(2, dtype=torch.float64))
    y4 = solve_penalized(nonconvex_f, x, 4.0, torch.zeros(2, dtype=torch.float64))
    assert_close(y4, 4.0 * x / (2 * 4.0 - 6))  # ∇: −6y + 4(2y − x) = 0


def test_float32_solves_stop_at_their_own_precision():
    """Newton's stopping step scales with the dtype's eps; results match the float32 closed form."""
    toy = make_quadratic(3, 5, 1.0, 4.0, seed=0, dtype=torch.float32)
    y_star = solve_lower(toy.problem, toy.x0, toy.y0)
    assert y_star.dtype == torch.float32
    assert_close(y_star, toy.y_star(toy.x0))
    assert_close(exact_hypergradient(toy.problem, toy.x0, y_star), toy.grad_phi(toy.x0))
