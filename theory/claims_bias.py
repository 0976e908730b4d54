"""Claim: the ScaleBiO penalty biases the hypergradient by O(1/α), within a rigorous bound.

For each toy and each α on a log grid we compute, with exact inner solves,

    error(α) = ‖∇Ψ*_α(x) − ∇Φ(x)‖

(∇Ψ*_α from :func:`~scalebio.theory.hypergrad.penalty_hypergradient`, i.e. through the library's
own ``penalty_surrogate``; ∇Φ by the implicit function theorem) and check two things:

1. error(α) ≤ C(α)/α at every α, with C from :mod:`scalebio.theory.bounds`: the explicit
   quadratic constant on the quadratic toys, the general F2SA-type lemma on the logistic toy.
2. The least-squares slope of log error against log α lies in [−1.1, −0.9]: the bias is first
   order in 1/α, neither faster (which would make the bound vacuous as a rate) nor slower.

:func:`run_claims` also returns the two-timescale claims of :mod:`.claims_tracking` (u's tracking
error falls with its steps per outer step K; the limit point keeps its O(1/α) bias at K = 2).
"""

from __future__ import annotations

import numpy as np
import torch

from scalebio.toy_problems.logistic import make_logistic_reweighting
from scalebio.toy_problems.quadratic import grad_y_upper_norm, make_quadratic

from . import claims_tracking
from .bounds import log_log_slope, penalty_bias_constant, quadratic_bias_constant
from .hypergrad import exact_hypergradient, penalty_hypergradient, solve_lower
from .report import Claim

SLOPE_BAND = (-1.1, -0.9)  # the lemma's exponent −1 ± 0.1: the O(1/α²) remainder and rounding
LOGISTIC_POINT_SEED = 1  # the logits at which the logistic bias is measured (a non-uniform π)


def alpha_grid(quick: bool) -> np.ndarray:
    """α ∈ [1e1, 1e4] (7 points) when quick, else [1e1, 1e6] (11 points), log-spaced."""
    return np.logspace(1, 4, 7) if quick else np.logspace(1, 6, 11)


def _claims_from(name: str, alphas, errors, bounds, how: str) -> list[Claim]:
    errors, bounds = np.asarray(errors), np.asarray(bounds)
    ratio = float(np.max(errors / bounds))
    slope = log_log_slope(alphas, errors)
    series = {"kind": "bias_vs_alpha", "alpha": [float(a) for a in alphas],
              "error": errors.tolist(), "bound": bounds.tolist(), "slope": slope}
    lo, hi = SLOPE_BAND
    return [
        Claim(
            name="penalty_bias_within_bound", problem=name, measured=ratio, bound=1.0,
            passed=bool(np.all(errors <= bounds)),
            detail=(f"max over {len(alphas)} α in [{alphas[0]:.0e}, {alphas[-1]:.0e}] of "
                    f"‖∇Ψ*_α − ∇Φ‖ / (C(α)/α) must be ≤ 1 with no tolerance; C from {how}"),
            series=series,
        ),
        Claim(
            name="penalty_bias_slope_-1", problem=name, measured=slope, bound=-1.0,
            passed=bool(lo <= slope <= hi),
            detail=(f"log-log slope of the bias against α must lie in [{lo}, {hi}] "
                    "(exponent −1; ±0.1 absorbs the O(1/α²) remainder and float64 rounding)"),
        ),
    ]


def quadratic_bias_claims(mu: float, L: float, quick: bool, seed: int = 0) -> list[Claim]:
    """Bias claims on ``make_quadratic(5, 10, mu, L, seed)`` at its x0."""
    toy = make_quadratic(5, 10, mu, L, seed)
    x = toy.x0
    y_star = solve_lower(toy.problem, x, toy.y0)
    exact = exact_hypergradient(toy.problem, x, y_star)
    grad_y_f = toy.P @ (y_star - toy.c)
    c = quadratic_bias_constant(toy.A, toy.B, toy.P, grad_y_f)
    alphas = alpha_grid(quick)
    errors, bounds = [], []
    for a in alphas:
        g = penalty_hypergradient(toy.problem, x, float(a), toy.y0, y_star=y_star)
        errors.append(float(torch.linalg.vector_norm(g - exact)))
        bounds.append(c / float(a))
    name = f"quadratic(dx=5,dy=10,kappa={L / mu:g})"
    how = (f"the explicit quadratic constant ‖B‖‖PA⁻¹∇_y f‖/μ = {c:.4g} (the general lemma "
           f"gives {_lemma_constant_quadratic(toy, x):.4g})")
    return _claims_from(name, alphas, errors, bounds, how)


def _lemma_constant_quadratic(toy, x) -> float:
    k = toy.constants
    return penalty_bias_constant(
        1.0, mu=k["mu"], l_f0=grad_y_upper_norm(toy, x), l_f1=k["l_f1"], l_g1=k["l_g1"],
        l_g2=k["l_g2"], m_f=k["m_f"], l_fx1=k["l_fx1"])


def logistic_bias_claims(quick: bool) -> list[Claim]:
    """Bias claims on the default logistic reweighting toy at seeded non-uniform logits."""
    toy = make_logistic_reweighting()
    gen = torch.Generator().manual_seed(LOGISTIC_POINT_SEED)
    x = torch.randn(toy.x0.shape, generator=gen, dtype=toy.x0.dtype)
    y_star = solve_lower(toy.problem, x, toy.y0)
    exact = exact_hypergradient(toy.problem, x, y_star)
    ys = y_star.clone().requires_grad_(True)
    (grad_y_f,) = torch.autograd.grad(toy.problem.upper(x, ys, None), ys)
    k = toy.constants
    # l_f0 at the point itself: the lemma only evaluates ∇_y f at y*(x) (see bounds module).
    consts = {"mu": k["mu"], "l_f0": float(grad_y_f.norm()), "l_f1": k["l_f1"],
              "l_g1": k["l_g1"], "l_g2": k["l_g2"], "m_f": k["m_f"], "l_fx1": k["l_fx1"]}
    alphas = alpha_grid(quick)
    errors, bounds = [], []
    for a in alphas:
        g = penalty_hypergradient(toy.problem, x, float(a), toy.y0, y_star=y_star)
        errors.append(float(torch.linalg.vector_norm(g - exact)))
        bounds.append(penalty_bias_constant(float(a), **consts) / float(a))
    name = f"logistic(K={toy.noise_rates.numel()},d={toy.y0.numel()},reg={toy.reg:g})"
    how = "the general lemma with μ = reg and the toy's global smoothness constants"
    return _claims_from(name, alphas, errors, bounds, how)


def run_claims(quick: bool = True) -> list[Claim]:
    """Bias claims on two quadratic conditionings (κ = 10, 100) and the logistic toy, then the
    two-timescale claims (tracking vs K, limit-point bias at K = 2)."""
    claims = quadratic_bias_claims(1.0, 10.0, quick)
    claims += quadratic_bias_claims(0.1, 10.0, quick)
    claims += logistic_bias_claims(quick)
    claims += claims_tracking.run_claims(quick)
    return claims
