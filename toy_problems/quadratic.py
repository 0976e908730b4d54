"""A quadratic bilevel toy with every quantity in closed form.

    g(x, y) = ½ yᵀA y − yᵀ(B x + b)              (lower; A ≻ 0, eigenvalues spread over [μ, L])
    f(x, y) = ½ (y − c)ᵀP(y − c) + ½ ρ ‖x‖²       (upper; P ⪰ 0)

so that, with M = A⁻¹B,

    y*(x)   = A⁻¹(B x + b) = M x + A⁻¹b
    Φ(x)    = f(x, y*(x)),            ∇Φ(x)   = ρ x + Mᵀ P (y*(x) − c)
    y_α(x)  = (P + αA)⁻¹ (P c + α(B x + b))
    ∇Ψ*_α(x) = ρ x + α Bᵀ (y*(x) − y_α(x))        (∇_x g(x, y) = −Bᵀy)

The stochastic variant adds zero-mean noise to both levels through the batch,
f(x, y; ξ) = f(x, y) + ξ_fᵀ y and g(x, y; ξ) = g(x, y) − ξ_gᵀ y with ξ ~ N(0, σ²I), so every
stochastic gradient w.r.t. y is unbiased with variance E‖ξ‖² = σ² dim_y per level and the
x-gradients are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from scalebio.problem import BilevelProblem, generic_problem


class QuadraticToy(NamedTuple):
    """Everything a test needs about one quadratic instance (all tensors in ``dtype``).

    Attributes:
      problem: the :class:`scalebio.BilevelProblem` (batch None = deterministic, or a batch from
        ``sample_batch``).
      x0, y0: starting points (x0 random, y0 = 0).
      A, B, b, P, c, rho: the data defining f and g (see module docstring).
      y_star, phi, grad_phi: closed forms of y*(x), Φ(x), ∇Φ(x).
      y_alpha, grad_penalty, penalty_value: closed forms of y_α(x), ∇Ψ*_α(x), Ψ*_α(x)
        (each takes (x, alpha)).
      phi_min: inf_x Φ (ρ > 0 makes Φ strongly convex), and x_min its minimiser.
      hess_phi: ∇²Φ = MᵀPM + ρI (constant).
      sample_batch: generator → batch of noise (ξ_f, ξ_g) with per-entry std ``sigma``.
      constants: μ, L, κ = L/μ, l_g1 = ‖B‖ (‖∇²_{xy} g‖), l_g2 = 0, l_f1 = ‖P‖, m_f = 0
        (f convex in y), l_fx1 = 0 (∇_x f does not depend on y), L_phi = ‖∇²Φ‖, sigma,
        noise_var = σ² dim_y (E‖noise‖² of one stochastic y-gradient per level).
    """

    problem: BilevelProblem
    x0: Tensor
    y0: Tensor
    A: Tensor
    B: Tensor
    b: Tensor
    P: Tensor
    c: Tensor
    rho: float
    y_star: Callable[[Tensor], Tensor]
    phi: Callable[[Tensor], Tensor]
    grad_phi: Callable[[Tensor], Tensor]
    y_alpha: Callable[[Tensor, float], Tensor]
    grad_penalty: Callable[[Tensor, float], Tensor]
    penalty_value: Callable[[Tensor, float], Tensor]
    phi_min: float
    x_min: Tensor
    hess_phi: Tensor
    sample_batch: Callable[[torch.Generator], Any]
    constants: dict


def _spd_with_spectrum(eigs: Tensor, gen: torch.Generator, dtype) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), generator=gen, dtype=dtype))
    return (q * eigs) @ q.T


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0 < alpha < float("inf")):
        raise ValueError(f"alpha: the penalty must be a finite number > 0, got {alpha!r}")


def make_quadratic(dim_x: int, dim_y: int, mu: float, L: float, seed: int,
                   dtype=torch.float64, rho: float = 0.1, sigma: float = 0.0) -> QuadraticToy:
    """Seeded quadratic bilevel instance whose lower Hessian A has spectrum exactly in [μ, L].

    A's eigenvalues are μ, L and dim_y − 2 log-uniform values between them; P is PSD with ‖P‖ = 1
    (rank min(dim_y, dim_x + 1)); B has i.i.d. N(0, 1/dim_x) entries.

    Args:
      dim_x, dim_y: sizes of the upper and lower variables (≥ 1; dim_y ≥ 2 when μ < L).
      mu, L: extreme eigenvalues of A, 0 < μ ≤ L (κ = L/μ is the condition number).
      seed: seeds the one torch.Generator used for every draw.
      dtype: floating dtype of every tensor.
      rho: upper-level ridge ρ ≥ 0 on x.
      sigma: per-entry standard deviation of the stochastic variant's noise (≥ 0).

    Returns:
      :class:`QuadraticToy`.
    """
    for name, v in (("dim_x", dim_x), ("dim_y", dim_y)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    if not (0 < mu <= L < float("inf")):
        raise ValueError(f"mu, L: need 0 < mu ≤ L < inf, got mu={mu!r}, L={L!r}")
    if mu < L and dim_y < 2:
        raise ValueError("dim_y: need dim_y ≥ 2 to realise both mu and L as eigenvalues")
    if not rho >= 0 or not sigma >= 0:
        raise ValueError(f"rho, sigma: must be ≥ 0, got rho={rho!r}, sigma={sigma!r}")
    gen = torch.Generator().manual_seed(seed)
    inner = torch.rand(max(dim_y - 2, 0), generator=gen, dtype=dtype)
    log_eigs = torch.log(torch.tensor([mu, L], dtype=dtype))
    mid = torch.exp(log_eigs[0] + inner * (log_eigs[1] - log_eigs[0]))
    eigs = torch.cat([torch.tensor([mu, L], dtype=dtype)[: min(dim_y, 2)], mid])
    A = _spd_with_spectrum(eigs, gen, dtype)
    B = torch.randn(dim_y, dim_x, generator=gen, dtype=dtype) / dim_x**0.5
    b = torch.randn(dim_y, generator=gen, dtype=dtype)
    rank = min(dim_y, dim_x + 1)
    F = torch.randn(dim_y, rank, generator=gen, dtype=dtype)
    P = F @ F.T
    P = P / torch.linalg.matrix_norm(P, ord=2)
    c = torch.randn(dim_y, generator=gen, dtype=dtype)
    x0 = torch.randn(dim_x, generator=gen, dtype=dtype)
    y0 = torch.zeros(dim_y, dtype=dtype)

    def upper(x, y, batch):
        r = y - c
        val = 0.5 * r @ (P @ r) + 0.5 * rho * (x * x).sum()
        return val if batch is None else val + batch[0] @ y

    def lower(x, y, batch):
        val = 0.5 * y @ (A @ y) - y @ (B @ x + b)
        return val if batch is None else val - batch[1] @ y

    def y_star(x):
        return torch.linalg.solve(A, B @ x + b)

    def phi(x):
        r = y_star(x) - c
        return 0.5 * r @ (P @ r) + 0.5 * rho * (x * x).sum()

    M = torch.linalg.solve(A, B)

    def grad_phi(x):
        return rho * x + M.T @ (P @ (y_star(x) - c))

    def y_alpha(x, alpha):
        _check_alpha(alpha)
        return torch.linalg.solve(P + alpha * A, P @ c + alpha * (B @ x + b))

    def grad_penalty(x, alpha):
        return rho * x + alpha * B.T @ (y_star(x) - y_alpha(x, alpha))

    def penalty_value(x, alpha):
        ya, ys = y_alpha(x, alpha), y_star(x)
        return upper(x, ya, None) + alpha * (lower(x, ya, None) - lower(x, ys, None))

    hess_phi = M.T @ P @ M + rho * torch.eye(dim_x, dtype=dtype)
    # ∇Φ(x) = H x + M^T P (A⁻¹b − c) = 0 at the minimiser (H ≻ 0 when ρ > 0).
    x_min = torch.linalg.lstsq(hess_phi, -M.T @ (P @ (torch.linalg.solve(A, b) - c))).solution
    phi_min = float(phi(x_min))

    def sample_batch(generator: torch.Generator):
        noise = sigma * torch.randn(2, dim_y, generator=generator, dtype=dtype)
        return noise[0], noise[1]

    constants = {
        "mu": float(mu), "L": float(L), "kappa": float(L / mu),
        "l_g1": float(torch.linalg.matrix_norm(B, ord=2)), "l_g2": 0.0,
        "l_f1": float(torch.linalg.matrix_norm(P, ord=2)), "m_f": 0.0, "l_fx1": 0.0,
        "L_phi": float(torch.linalg.eigvalsh(hess_phi).max()),
        "sigma": float(sigma), "noise_var": float(sigma**2 * dim_y),
    }
    return QuadraticToy(
        problem=generic_problem(upper, lower), x0=x0, y0=y0, A=A, B=B, b=b, P=P, c=c, rho=rho,
        y_star=y_star, phi=phi, grad_phi=grad_phi, y_alpha=y_alpha, grad_penalty=grad_penalty,
        penalty_value=penalty_value, phi_min=phi_min, x_min=x_min, hess_phi=hess_phi,
        sample_batch=sample_batch, constants=constants,
    )


def grad_y_upper_norm(toy: QuadraticToy, x: Tensor) -> float:
    """‖∇_y f(x, y*(x))‖ = ‖P (y*(x) − c)‖: the l_{f,0} the bias lemma needs at x."""
    return float(torch.linalg.vector_norm(toy.P @ (toy.y_star(x) - toy.c)))


def penalty_minimiser(toy: QuadraticToy, alpha: float) -> Tensor:
    """argmin_x Ψ*_α(x): the limit point of ScaleBiO at a constant penalty α (closed form).

    ∇Ψ*_α(x) = ρx + αBᵀ(y*(x) − y_α(x)) is affine in x: with A_α = P + αA,
    y*(x) − y_α(x) = (A⁻¹ − αA_α⁻¹)(Bx + b) − A_α⁻¹Pc, so the minimiser solves
    [ρI + αBᵀ(A⁻¹ − αA_α⁻¹)B] x = −αBᵀ[(A⁻¹ − αA_α⁻¹)b − A_α⁻¹Pc]. The matrix equals
    ρI + αBᵀA⁻¹PA_α⁻¹B ⪰ ρI (A⁻¹ − αA_α⁻¹ = A⁻¹PA_α⁻¹), so it is invertible when ρ > 0.
    """
    _check_alpha(alpha)
    if not toy.rho > 0:
        raise ValueError(f"toy.rho: need an upper ridge ρ > 0 for a unique minimiser, "
                         f"got {toy.rho!r}")
    a_alpha = toy.P + alpha * toy.A
    # A⁻¹PA_α⁻¹ written as the difference A⁻¹ − αA_α⁻¹ of the two solves (symmetric PSD)
    diff = torch.linalg.inv(toy.A) - alpha * torch.linalg.inv(a_alpha)
    eye = torch.eye(toy.B.shape[1], dtype=toy.B.dtype)
    lhs = toy.rho * eye + alpha * toy.B.T @ diff @ toy.B
    rhs = -alpha * toy.B.T @ (diff @ toy.b - torch.linalg.solve(a_alpha, toy.P @ toy.c))
    return torch.linalg.solve(lhs, rhs)
