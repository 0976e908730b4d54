"""Data reweighting on L2-regularised logistic regression with label-noisy sources.

K training sources share one clean linear rule; source k flips each label with probability r_k.
The upper level is the validation logistic loss on clean data, the lower level the π-weighted mean
of per-source losses, π = softmax(θ) from :mod:`scalebio.simplex`:

    f(y)    = (1/n_v) Σ_i softplus(−b_i a_iᵀy)                       (clean validation)
    g(θ, y) = Σ_k π_k(θ) L_k(y) + (reg/2)‖y‖²,  L_k(y) = mean over source k of softplus(−b a ᵀy)

(reg is folded into every source's loss, which changes nothing as Σπ_k = 1.) Features are unit
vectors, so R = max‖a‖ = 1. Everything needed for a reference hypergradient is written out here by
hand (gradients, Hessians, Newton) rather than taken from ``scalebio.theory``, so that the two can
be checked against each other:

    H = Σ_k π_k ∇²L_k(y*) + reg·I,   ∂Φ/∂π_k = −∇L_k(y*)ᵀ H⁻¹ ∇f(y*),   ∇_θΦ = J(π) ∂Φ/∂π,

with J(π) = diag(π) − ππᵀ (the softmax Jacobian, symmetric).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from scalebio.problem import BilevelProblem, reweighting_problem
from scalebio.simplex import SimplexSpec, init_logits, make_simplex, weights

_NEWTON_XTOL = 1e-14  # relative Newton step at which the inner solve has reached machine precision


class LogisticToy(NamedTuple):
    """Everything a test needs about one reweighting instance (float64 unless told otherwise).

    Attributes:
      problem: the :class:`scalebio.BilevelProblem` (x = logits θ, y = linear model, batch unused).
      spec: the simplex parametrization (plain softmax, uniform prior).
      x0, y0: θ₀ = 0 (uniform weights), y₀ = 0.
      features: (K, n, d) training features; labels: (K, n) in {−1, +1} after noise.
      val_features: (n_v, d); val_labels: (n_v,), clean.
      noise_rates: (K,) label-flip probabilities r_k.
      reg: the ridge coefficient (= μ).
      y_star(θ, y_init=None): y*(θ) by damped Newton (optionally warm-started).
      phi(θ), grad_phi(θ, y_star_x=None): Φ(θ) and ∇Φ(θ) by the implicit function theorem.
      y_alpha(θ, α, y_init=None): argmin_y f(y) + α g(θ, y), same Newton.
      grad_penalty(θ, α, y_alpha_x=None, y_star_x=None): ∇Ψ*_α(θ) = α J(π)[L(y_α) − L(y*)].
      constants: μ = reg, l_f0 ≥ ‖∇f‖, l_f1 ≥ ‖∇²f‖, m_f = 0, l_fx1 = 0, l_g1 = c1/√2, l_g2, and
        c1, c2, c3 (bounds on ‖∇L_k‖, ‖∇²L_k‖ and the Lipschitz constant of ∇²L_k without the
        ridge), R = max‖a‖; all hold for every θ and y (see ``scalebio.theory.bounds``).
    """

    problem: BilevelProblem
    spec: SimplexSpec
    x0: Tensor
    y0: Tensor
    features: Tensor
    labels: Tensor
    val_features: Tensor
    val_labels: Tensor
    noise_rates: Tensor
    reg: float
    y_star: Callable[..., Tensor]
    phi: Callable[[Tensor], Tensor]
    grad_phi: Callable[..., Tensor]
    y_alpha: Callable[..., Tensor]
    grad_penalty: Callable[..., Tensor]
    constants: dict


def _unit_rows(n: int, d: int, gen: torch.Generator, dtype) -> Tensor:
    z = torch.randn(n, d, generator=gen, dtype=dtype)
    return z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)


def _mean_logistic(feats: Tensor, labels: Tensor, y: Tensor) -> Tensor:
    """Mean of softplus(−b aᵀy) over the last example axis."""
    return F.softplus(-labels * (feats @ y)).mean(dim=-1)


def _grad_hess(feats: Tensor, labels: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """∇ and ∇² of the mean logistic loss, by hand: −mean σ(−m) b a and mean σ(m)σ(−m) a aᵀ."""
    m = labels * (feats @ y)
    s = torch.sigmoid(-m)
    n = feats.shape[-2]
    grad = -((s * labels).unsqueeze(-1) * feats).sum(dim=-2) / n
    curv = s * (1 - s)
    hess = torch.einsum("...i,...ij,...ik->...jk", curv, feats, feats) / n
    return grad, hess


def make_logistic_reweighting(num_sources: int = 4, dim: int = 8, n_per_source: int = 200,
                              n_val: int = 200, noise_rates=None, reg: float = 0.2,
                              signal: float = 4.0, seed: int = 0,
                              dtype=torch.float64) -> LogisticToy:
    """Seeded reweighting toy: K sources of one clean linear rule with label noise r_k.

    Args:
      num_sources: K ≥ 2.
      dim: feature dimension d ≥ 1.
      n_per_source: examples per source (equal sizes).
      n_val: clean validation examples.
      noise_rates: K flip probabilities in [0, 0.5); default evenly spaced in [0, 0.45].
      reg: ridge coefficient > 0; it is the lower level's strong-convexity modulus μ.
      signal: ‖w_true‖; the clean labels are sign(aᵀw_true).
      seed: seeds the one torch.Generator behind every draw.
      dtype: floating dtype.
    """
    if not (isinstance(num_sources, int) and num_sources >= 2):
        raise ValueError(f"num_sources: need at least 2 sources, got {num_sources!r}")
    for name, v in (("dim", dim), ("n_per_source", n_per_source), ("n_val", n_val)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    if not (isinstance(reg, (int, float)) and 0 < reg < float("inf")):
        raise ValueError(f"reg: the ridge must be a finite number > 0, got {reg!r}")
    if noise_rates is None:
        noise_rates = torch.linspace(0.0, 0.45, num_sources, dtype=dtype)
    rates = torch.as_tensor(noise_rates, dtype=dtype).flatten()
    if rates.numel() != num_sources or (rates < 0).any() or (rates >= 0.5).any():
        raise ValueError(f"noise_rates: need {num_sources} values in [0, 0.5), got "
                         f"{rates.tolist()}")
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, generator=gen, dtype=dtype)
    w_true = signal * w_true / torch.linalg.vector_norm(w_true)
    feats = _unit_rows(num_sources * n_per_source, dim, gen, dtype).reshape(
        num_sources, n_per_source, dim)
    clean = torch.sign(feats @ w_true)
    flips = torch.rand(num_sources, n_per_source, generator=gen, dtype=dtype) < rates[:, None]
    labels = torch.where(flips, -clean, clean)
    val_feats = _unit_rows(n_val, dim, gen, dtype)
    val_labels = torch.sign(val_feats @ w_true)

    spec = make_simplex(num_sources)

    def val_loss(y, batch):
        return _mean_logistic(val_feats, val_labels, y)

    def source_losses(y, batch):
        return _mean_logistic(feats, labels, y) + 0.5 * reg * (y * y).sum()

    problem = reweighting_problem(val_loss, source_losses, spec)

    eye = torch.eye(dim, dtype=dtype)
    # One stacked design for Newton: rows b·a of every training example, then of validation.
    signed = torch.cat([(labels[..., None] * feats).reshape(-1, dim),
                        val_labels[:, None] * val_feats])

    def _solve(x: Tensor, alpha: float | None, y_init: Tensor | None) -> Tensor:
        """argmin_y s·f(y) + a·g(θ, y) by damped Newton: (s, a) = (0, 1) for y*, (1, α) for y_α."""
        s_f, a = (0.0, 1.0) if alpha is None else (1.0, float(alpha))
        pi = weights(x.detach(), spec)
        # h(y) = Σ_i c_i softplus(−b_i a_iᵀy) + (a·reg/2)‖y‖²: per-row weights c_i.
        coef = torch.cat([(a * pi / n_per_source).repeat_interleave(n_per_source),
                          torch.full((n_val,), s_f / n_val, dtype=dtype)])
        ridge = a * reg

        def value(y):
            return float(coef @ F.softplus(-(signed @ y)) + 0.5 * ridge * y @ y)

        y = torch.zeros(dim, dtype=dtype) if y_init is None else y_init.detach().clone()
        for _ in range(100):
            sig = torch.sigmoid(-(signed @ y))
            grad = ridge * y - signed.T @ (coef * sig)
            hess = (signed.T * (coef * sig * (1 - sig))) @ signed + ridge * eye
            step = -torch.linalg.solve(hess, grad)
            # Strongly convex objective: a backtracked Newton step always exists, and full steps
            # are taken near the optimum (the 1e-15 slack lets rounding-level ties pass).
            v0, t = value(y), 1.0
            while t > 1e-10 and value(y + t * step) > v0 + 1e-4 * t * float(grad @ step) + (
                    1e-15 * abs(v0)):
                t *= 0.5
            y = y + t * step
            if float(step.norm()) <= _NEWTON_XTOL * (1.0 + float(y.norm())):
                return y
        raise RuntimeError("logistic toy: Newton did not converge in 100 iterations")

    def y_star(x: Tensor, y_init: Tensor | None = None) -> Tensor:
        return _solve(x, None, y_init)

    def y_alpha(x: Tensor, alpha: float, y_init: Tensor | None = None) -> Tensor:
        if not (isinstance(alpha, (int, float)) and 0 < alpha < float("inf")):
            raise ValueError(f"alpha: the penalty must be a finite number > 0, got {alpha!r}")
        return _solve(x, alpha, y_init)

    def grad_penalty(x: Tensor, alpha: float, y_alpha_x: Tensor | None = None,
                     y_star_x: Tensor | None = None) -> Tensor:
        # ∇Ψ*_α = α J(π)[L(y_α) − L(y*)]; f has no θ and the ridge cancels (J 1 = 0).
        pi = weights(x.detach(), spec)
        ya = y_alpha(x, alpha) if y_alpha_x is None else y_alpha_x
        ys = y_star(x) if y_star_x is None else y_star_x
        gap = _mean_logistic(feats, labels, ya) - _mean_logistic(feats, labels, ys)
        return alpha * (torch.diag(pi) - torch.outer(pi, pi)) @ gap

    def phi(x: Tensor) -> Tensor:
        return _mean_logistic(val_feats, val_labels, y_star(x))

    def grad_phi(x: Tensor, y_star_x: Tensor | None = None) -> Tensor:
        pi = weights(x.detach(), spec)
        y = y_star(x) if y_star_x is None else y_star_x
        g_k, h_k = _grad_hess(feats, labels, y)
        hess = torch.einsum("k,kij->ij", pi, h_k) + reg * eye
        grad_f, _ = _grad_hess(val_feats, val_labels, y)
        dphi_dpi = -g_k @ torch.linalg.solve(hess, grad_f)
        jac = torch.diag(pi) - torch.outer(pi, pi)
        return jac @ dphi_dpi

    # Smoothness constants from the data (global in θ and y). With S = mean a aᵀ of a source,
    # and ℓ(m) = softplus(−m) having |ℓ′| ≤ 1, ℓ″ ≤ 1/4, |ℓ‴| ≤ 1/(6√3):
    #   ‖∇L_k‖ = ‖(1/n) A_kᵀ(ℓ′·b)‖ ≤ λ_max(S_k)^½,   ∇²L_k ⪯ S_k/4,
    #   |∇³L_k[u,u,u]| ≤ mean|aᵀu|³/(6√3) ≤ R λ_max(S_k)‖u‖³/(6√3).
    lam = torch.linalg.eigvalsh(feats.transpose(-1, -2) @ feats / n_per_source)[..., -1].max()
    lam_v = torch.linalg.eigvalsh(val_feats.T @ val_feats / n_val)[-1]
    r = float(torch.linalg.vector_norm(feats, dim=-1).max())
    c1, c2, c3 = float(lam.sqrt()), float(lam) / 4, r * float(lam) / (6 * math.sqrt(3))
    constants = {
        "mu": float(reg), "l_f0": float(lam_v.sqrt()), "l_f1": float(lam_v) / 4, "m_f": 0.0,
        "l_fx1": 0.0,
        # ∇²_{xy}g = J Gᵀ with ‖Ju‖₁ ≤ ‖u‖/√2: ‖J Gᵀ‖ ≤ c1/√2, Lipschitz in y with c2/√2.
        "l_g1": c1 / math.sqrt(2), "l_g2": max(c3, c2 / math.sqrt(2)),
        "c1": c1, "c2": c2, "c3": c3, "R": r,
    }
    return LogisticToy(
        problem=problem, spec=spec, x0=init_logits(spec, dtype=dtype),
        y0=torch.zeros(dim, dtype=dtype), features=feats, labels=labels, val_features=val_feats,
        val_labels=val_labels, noise_rates=rates, reg=float(reg), y_star=y_star, phi=phi,
        grad_phi=grad_phi, y_alpha=y_alpha, grad_penalty=grad_penalty, constants=constants,
    )
