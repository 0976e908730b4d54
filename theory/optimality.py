"""Optimality on the probability simplex: a reference solver and the KKT conditions.

For min_{π ∈ Δ} Φ(π), Δ = {π ≥ 0, Σπ = 1}, the KKT conditions are: there is ν ∈ R with

    ∇_k Φ(π) = ν   for every k with π_k > 0,
    ∇_k Φ(π) ≥ ν   for every k with π_k = 0.

Equivalently π is a fixed point of the projected-gradient map, π = P_Δ(π − ∇Φ(π)); the norm of
π − P_Δ(π − ∇Φ) (the *natural residual*) needs no support threshold. This module works on numpy
arrays and plain callables, so it serves every toy with a closed-form Φ and ∇Φ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize

SUPPORT_TOL = 1e-7  # π_k below this counts as 0: SLSQP leaves inactive bounds at ~1e-12–1e-9
SLSQP_FTOL = 1e-15  # near machine precision on Φ: we want the minimiser, not just the value


class KKTReport(NamedTuple):
    """The KKT conditions at a point of the simplex.

    Attributes:
      nu: the multiplier ν, the mean of ∇Φ over the support.
      stationarity: max over the support of |∇_k Φ − ν|.
      dual_violation: max over the zero set of (ν − ∇_k Φ)₊ (0 when the zero set is empty).
      residual: max(stationarity, dual_violation); 0 exactly at a KKT point.
      natural_residual: ‖π − P_Δ(π − ∇Φ)‖_∞, threshold-free, 0 exactly at a KKT point.
      support: bool mask {k : π_k > support_tol}.
    """

    nu: float
    stationarity: float
    dual_violation: float
    residual: float
    natural_residual: float
    support: np.ndarray


class SimplexSolution(NamedTuple):
    """Result of :func:`minimize_on_simplex`: the best of all starts."""

    weights: np.ndarray
    value: float
    kkt: KKTReport
    values: np.ndarray  # Φ at the end of each start, to judge multi-modality


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto Δ: P_Δ(v)_k = max(v_k − τ, 0) with τ such that the sum is 1.

    τ comes from the sorted values u_1 ≥ … ≥ u_K: ρ = max{j : u_j − (Σ_{i≤j} u_i − 1)/j > 0},
    τ = (Σ_{i≤ρ} u_i − 1)/ρ (the standard sort-based algorithm).
    """
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"v: expected a non-empty vector, got shape {v.shape}")
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    j = np.arange(1, v.size + 1)
    rho = int(np.nonzero(u - css / j > 0)[0][-1]) + 1
    return np.maximum(v - css[rho - 1] / rho, 0.0)


def simplex_kkt(weights: np.ndarray, grad: np.ndarray,
                support_tol: float = SUPPORT_TOL) -> KKTReport:
    """Check the simplex KKT conditions of min Φ at ``weights`` given ``grad`` = ∇_π Φ(weights).

    Args:
      weights: a point of the simplex (K,).
      grad: ∇_π Φ at that point (K,).
      support_tol: entries ≤ this count as zero.

    Returns:
      :class:`KKTReport`. Raises ValueError if ``weights`` is off the simplex or shapes differ.
    """
    pi = np.asarray(weights, dtype=np.float64)
    g = np.asarray(grad, dtype=np.float64)
    if pi.shape != g.shape or pi.ndim != 1:
        raise ValueError(f"grad: shape {g.shape} does not match weights {pi.shape}")
    if (pi < -support_tol).any() or abs(pi.sum() - 1.0) > 1e-8:
        raise ValueError(f"weights: not on the simplex (min {pi.min():.3g}, sum {pi.sum():.12g})")
    support = pi > support_tol
    nu = float(g[support].mean())
    stat = float(np.abs(g[support] - nu).max())
    dual = float(np.maximum(nu - g[~support], 0.0).max()) if (~support).any() else 0.0
    natural = float(np.abs(pi - project_simplex(pi - g)).max())
    return KKTReport(nu, stat, dual, max(stat, dual), natural, support)


def _starts(k: int, num_random: int, seed: int) -> list[np.ndarray]:
    """Uniform, the K near-vertices (0.9 on one source) and Dirichlet(1) draws."""
    rng = np.random.default_rng(seed)
    near_vertices = [np.full(k, 0.1 / (k - 1)) + np.eye(k)[i] * (0.9 - 0.1 / (k - 1))
                     for i in range(k)] if k > 1 else []
    return [np.full(k, 1.0 / k), *near_vertices, *rng.dirichlet(np.ones(k), size=num_random)]


def minimize_on_simplex(fun: Callable[[np.ndarray], float],
                        grad: Callable[[np.ndarray], np.ndarray],
                        num_sources: int, num_random_starts: int = 8, seed: int = 0,
                        starts: list[np.ndarray] | None = None) -> SimplexSolution:
    """Reference solver: multi-start SLSQP on min_{π ∈ Δ} Φ(π) with the exact gradient.

    Each start runs SLSQP (bounds 0 ≤ π ≤ 1, equality Σπ = 1, ftol 1e-15); the result is the start
    with the smallest Φ, re-projected onto Δ to remove round-off; its KKT report says how exact.

    Args:
      fun: Φ on numpy vectors.  grad: ∇_π Φ on numpy vectors.
      num_sources: K.
      num_random_starts: Dirichlet(1) starts drawn from ``np.random.default_rng(seed)``, besides
        the uniform point and the K near-vertices.
      starts: explicit starting points instead of the default set.
    """
    if not (isinstance(num_sources, int) and num_sources >= 1):
        raise ValueError(f"num_sources: need a positive integer, got {num_sources!r}")
    points = starts if starts is not None else _starts(num_sources, num_random_starts, seed)
    best, values = None, []
    for p0 in points:
        p0 = np.asarray(p0, dtype=np.float64)
        if p0.shape != (num_sources,):
            raise ValueError(f"starts: a start has shape {p0.shape}, expected ({num_sources},)")
        res = minimize(fun, p0, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * num_sources,
                       constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1.0,
                                     "jac": lambda p: np.ones_like(p)}],
                       options={"ftol": SLSQP_FTOL, "maxiter": 1000})
        pi = project_simplex(res.x)
        val = float(fun(pi))
        values.append(val)
        if best is None or val < best[1]:
            best = (pi, val)
    pi, val = best
    return SimplexSolution(pi, val, simplex_kkt(pi, grad(pi)), np.asarray(values))
