"""Bounds as pure functions: the O(1/α) penalty bias and the inexact-gradient descent bound.

Notation (bilevel min_x Φ(x) = f(x, y*(x)), y*(x) = argmin_y g(x, y), penalty α):

* μ        — g(x, ·) is μ-strongly convex (everywhere on the segment [y*, y_α]).
* l_{f,0}  — ‖∇_y f(x, y*(x))‖. A global Lipschitz constant of f in y works; so does the value at
             the point x itself, because the lemma below only evaluates ∇_y f at y*.
* l_{f,1}  — ∇_y f(x, ·) is l_{f,1}-Lipschitz in y; l_fx1 the same for ∇_x f(x, ·) (0 when f's
             x-part does not involve y, default l_{f,1}); m_f ≥ 0 with ∇²_{yy} f ⪰ −m_f I
             (0 for f convex in y, default l_{f,1}).
* l_{g,1}  — ‖∇²_{xy} g(x, y*)‖ (the block mapping a change of y to a change of ∇_x g).
* l_{g,2}  — ∇²_{xy} g and ∇²_{yy} g are l_{g,2}-Lipschitz in y.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _positive(name: str, v: float, allow_zero: bool = True) -> float:
    ok = v >= 0 if allow_zero else v > 0
    if not (isinstance(v, (int, float)) and math.isfinite(v) and ok):
        need = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number {need}, got {v!r}")
    return float(v)


def penalty_bias_constant(alpha: float, *, mu: float, l_f0: float, l_f1: float, l_g1: float,
                          l_g2: float, m_f: float | None = None,
                          l_fx1: float | None = None) -> float:
    """C(α) with ‖∇Ψ*_α(x) − ∇Φ(x)‖ ≤ C(α)/α for every α > α_min = m_f/μ (F2SA-type lemma).

        C(α) = (l_fx1 + κ l_{f,1}) D + ½ l_{g,2} (1 + κ) D²,
        κ = l_{g,1}/μ,    D = l_{f,0} / (μ − m_f/α).

    C(α) decreases in α, so C(α₀) bounds α·bias for every α ≥ α₀ > α_min.

    Derivation sketch. Write δ = y_α − y*, H = ∇²_{yy} g(x, y*) ⪰ μI, X = ∇²_{xy} g(x, y*).
    (1) h = f + αg is (αμ − m_f)-strongly convex and ∇h(y*) = ∇_y f(x, y*), so ‖δ‖ ≤ D/α.
    (2) Optimality of y_α and y*: α(Hδ + R_y) = −∇_y f(x, y_α), with ‖R_y‖ ≤ ½ l_{g,2}‖δ‖²
        (Taylor, Lipschitz Hessian); likewise α[∇_x g(y_α) − ∇_x g(y*)] = αXδ + αR_x,
        ‖R_x‖ ≤ ½ l_{g,2}‖δ‖².
    (3) Substituting αδ into ∇Ψ*_α = ∇_x f(y_α) + α[∇_x g(y_α) − ∇_x g(y*)] and subtracting
        ∇Φ = ∇_x f(y*) − X H⁻¹ ∇_y f(y*):
            ∇Ψ*_α − ∇Φ = [∇_x f(y_α) − ∇_x f(y*)] − X H⁻¹[∇_y f(y_α) − ∇_y f(y*)]
                          − α X H⁻¹ R_y + α R_x,
        whose norm is ≤ (l_fx1 + κ l_{f,1})‖δ‖ + ½ α l_{g,2}(1 + κ)‖δ‖², and (1) gives C(α)/α.
    For a quadratic lower level (l_{g,2} = 0) with f convex in y (m_f = 0) the second term and
    the α-dependence vanish: C = (l_fx1 + κ l_{f,1}) l_{f,0}/μ for every α > 0.

    Args:
      alpha: penalty α; must exceed α_min = m_f/μ.
      mu, l_f0, l_f1, l_g1, l_g2, m_f, l_fx1: see the module docstring.

    Returns:
      C(α) (a float). Raises ValueError naming the argument that is out of range.
    """
    mu = _positive("mu", mu, allow_zero=False)
    l_f0, l_f1 = _positive("l_f0", l_f0), _positive("l_f1", l_f1)
    l_g1, l_g2 = _positive("l_g1", l_g1), _positive("l_g2", l_g2)
    m_f = l_f1 if m_f is None else _positive("m_f", m_f)
    l_fx1 = l_f1 if l_fx1 is None else _positive("l_fx1", l_fx1)
    alpha = _positive("alpha", alpha, allow_zero=False)
    if alpha * mu <= m_f:
        raise ValueError(
            f"alpha: the lemma needs alpha > m_f/mu = {m_f / mu:.6g} (f + alpha g strongly "
            f"convex), got {alpha!r}"
        )
    kappa = l_g1 / mu
    d = l_f0 / (mu - m_f / alpha)
    return (l_fx1 + kappa * l_f1) * d + 0.5 * l_g2 * (1.0 + kappa) * d * d


def penalty_bias_bound(alpha: float, **constants: float) -> float:
    """C(α)/α: the bound on ‖∇Ψ*_α(x) − ∇Φ(x)‖ (keyword constants as in
    :func:`penalty_bias_constant`)."""
    return penalty_bias_constant(alpha, **constants) / alpha


def quadratic_bias_constant(A: Tensor, B: Tensor, P: Tensor, grad_y_f: Tensor) -> float:
    """Explicit constant for g = ½yᵀAy − yᵀ(Bx + b), f = ½(y − c)ᵀP(y − c) + r(x), P ⪰ 0.

    Here y_α − y* = −(P + αA)⁻¹ ∇_y f(x, y*) and ∇_x g = −Bᵀy, so exactly

        ∇Ψ*_α − ∇Φ = −(1/α) Bᵀ (A + P/α)⁻¹ P A⁻¹ ∇_y f(x, y*),

    and since A + P/α ⪰ μI for P ⪰ 0, for every α > 0

        ‖∇Ψ*_α − ∇Φ‖ ≤ C/α,   C = ‖B‖ ‖P A⁻¹ ∇_y f(x, y*)‖ / μ,

    which tends to the exact limit ‖Bᵀ A⁻¹ P A⁻¹ ∇_y f‖ up to the factor ‖B‖‖A⁻¹u‖/‖BᵀA⁻¹u‖, and
    is never above the general lemma's κ l_{f,1} l_{f,0}/μ.

    Args:
      A: lower Hessian (symmetric positive definite).
      B: coupling matrix (dim_y × dim_x).
      P: upper Hessian in y (symmetric PSD).
      grad_y_f: ∇_y f(x, y*(x)) = P (y* − c).
    """
    if A.ndim != 2 or A.shape[0] != A.shape[1] or P.shape != A.shape:
        raise ValueError(f"A, P: need equal square matrices, got {tuple(A.shape)}, "
                         f"{tuple(P.shape)}")
    if B.ndim != 2 or B.shape[0] != A.shape[0] or grad_y_f.shape != (A.shape[0],):
        raise ValueError(f"B, grad_y_f: need ({A.shape[0]}, dim_x) and ({A.shape[0]},), got "
                         f"{tuple(B.shape)}, {tuple(grad_y_f.shape)}")
    mu = float(torch.linalg.eigvalsh(A).min())
    if mu <= 0:
        raise ValueError(f"A: must be positive definite, smallest eigenvalue {mu:.3g}")
    w = P @ torch.linalg.solve(A, grad_y_f)
    return float(torch.linalg.matrix_norm(B, ord=2)) * float(torch.linalg.vector_norm(w)) / mu


def log_log_slope(xs, ys) -> float:
    """Least-squares slope of log(ys) against log(xs) (all entries must be > 0)."""
    lx = torch.log(torch.as_tensor(xs, dtype=torch.float64))
    ly = torch.log(torch.as_tensor(ys, dtype=torch.float64))
    if lx.numel() < 2 or lx.shape != ly.shape or not torch.isfinite(lx + ly).all():
        raise ValueError("xs, ys: need ≥ 2 matching positive entries for a log-log fit")
    lx_c = lx - lx.mean()
    return float((lx_c * (ly - ly.mean())).sum() / (lx_c * lx_c).sum())


def inexact_descent_bound(t: int, eta: float, decrease: float, err_sq_sum: float) -> float:
    """Bound on min_{s<t} ‖∇F(x_s)‖ for x_{s+1} = x_s − η(∇F(x_s) + e_s), η ≤ 1/L_F:

        min_{s<t} ‖∇F(x_s)‖² ≤ 2 (F(x_0) − F(x_t)) / (η t) + (1/t) Σ_{s<t} ‖e_s‖².

    Proof: L_F-smoothness and η L_F ≤ 1 give F(x_{s+1}) ≤ F(x_s) − η⟨∇F, d_s⟩ + (η/2)‖d_s‖²
    = F(x_s) − (η/2)‖∇F(x_s)‖² + (η/2)‖e_s‖² for d_s = ∇F(x_s) + e_s; sum over s < t. Since
    F(x_t) ≥ inf F, the first term is at most 2(F(x_0) − inf F)/(ηt) = O(1/t).

    Args:
      t: number of steps taken (≥ 1).
      eta: step size η > 0 (the caller guarantees η ≤ 1/L_F).
      decrease: F(x_0) − F(x_t).
      err_sq_sum: Σ_{s<t} ‖e_s‖² (or an upper bound on it).
    """
    if not (isinstance(t, int) and t >= 1):
        raise ValueError(f"t: need a positive step count, got {t!r}")
    _positive("eta", eta, allow_zero=False)
    _positive("err_sq_sum", err_sq_sum)
    return math.sqrt(max(2.0 * decrease / (eta * t) + err_sq_sum / t, 0.0))


def reweighting_smoothness(*, mu: float, c1: float, c2: float, c3: float, l_f0: float,
                           l_f1: float) -> float:
    """L_Φ for Φ(θ) = f(y*(softmax θ)), y*(π) = argmin_y Σ_k π_k L_k(y) + (μ/2)‖y‖², L_k convex.

        L_Φ = l_{f,1} c1²/(2μ²) + l_{f,0} (c1 c2/μ² + c3 c1²/(2μ³)) + c1 l_{f,0}/μ,

    where ‖∇L_k‖ ≤ c1, ‖∇²L_k‖ ≤ c2, ∇²L_k is c3-Lipschitz, ‖∇f‖ ≤ l_{f,0}, ‖∇²f‖ ≤ l_{f,1}.

    Derivation sketch. Let ψ(π) = f(y*(π)), J = diag(π) − ππᵀ, v = Ju. Then ‖v‖₁ ≤ ‖u‖/√2
    (Cauchy–Schwarz with weights π: ‖Ju‖₁ ≤ (uᵀJu)^½) and uᵀJu ≤ ‖u‖²/2. With Y = dy*/dπ =
    −H⁻¹G (G's columns ∇L_k, H ⪰ μI): ‖Yv‖ ≤ c1‖v‖₁/μ. Differentiating the optimality condition
    twice, H D²y*[v,v] = −2Σ_k v_k ∇²L_k Yv − Σ_k π_k ∇³L_k[Yv, Yv]. Then
    ∇²Φ[u,u] = ∇²f[Yv, Yv] + ∇f·D²y*[v,v] + Σ_k ∂_kψ ∇²π_k[u,u], and
    Σ_k w_k∇²π_k[u,u] = Σ_k w_k π_k((u_k − πᵀu)² − uᵀJu) is at most ‖w‖_∞ · 2uᵀJu ≤ ‖w‖_∞‖u‖²,
    with |∂_kψ| = |∇L_kᵀH⁻¹∇f| ≤ c1 l_{f,0}/μ. Collecting terms gives L_Φ above.
    """
    mu = _positive("mu", mu, allow_zero=False)
    c1, c2, c3 = _positive("c1", c1), _positive("c2", c2), _positive("c3", c3)
    l_f0, l_f1 = _positive("l_f0", l_f0), _positive("l_f1", l_f1)
    return (l_f1 * c1**2 / (2 * mu**2) + l_f0 * (c1 * c2 / mu**2 + c3 * c1**2 / (2 * mu**3))
            + c1 * l_f0 / mu)
