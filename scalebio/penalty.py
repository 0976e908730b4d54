"""The ScaleBiO penalty minimax: the sign convention and the three update directions, written once.

Bilevel problem:  min_x Φ(x) = f(x, y*(x)),   y*(x) = argmin_y g(x, y).

First-order reformulation with penalty α > 0 and two copies y ("w" in the paper) and z ("u"):

    min_{x, y} max_z  Ψ_α(x, y, z) = f(x, y) + α [ g(x, y) − g(x, z) ]

so that, with every player *descending* on its own direction,

    d_x =  ∇_x Ψ_α = ∇_x f(x, y) + α [ ∇_x g(x, y) − ∇_x g(x, z) ]    (x descends on Ψ_α)
    d_y =  ∇_y Ψ_α = ∇_y f(x, y) + α ∇_y g(x, y)                       (y descends on Ψ_α)
    d_z = −∇_z Ψ_α = α ∇_z g(x, z)                                      (z ascends on Ψ_α)

No Hessian appears. The bias of d_x as an estimate of ∇Φ(x) is O(1/α) (see ``scalebio.theory``).

The lower objective is always written g(x, y) = G(x, H(y)), where H(y) are the *lower features* of
the model y — for data reweighting H(y) = (ℓ̄_1(y), …, ℓ̄_K(y)) are the per-source mean losses and
G(x, h) = Σ_k π_k(x) h_k; for a generic problem H is the identity. This split lets one scalar carry
all three directions through a single backward pass, even when y and z are whole language models:

    S = f(x, y) + α G(x, H(y)) − α G(x, sg H(z)) + α G(sg x, H(z))

where sg is stop-gradient. Then ∇_x S = d_x, ∇_y S = d_y and ∇_z S = d_z, while the value of S
equals f + α g(x, y) + 0. Both the toy solver (``scalebio.solver``) and the LLM loop
(``scalebio.llm``) obtain their gradients from :func:`penalty_surrogate` and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

Combine = Callable[[Tensor, Tensor], Tensor]


class PenaltyTerms(NamedTuple):
    """The scalar whose gradients are the descent directions, and the values to log.

    Attributes:
      surrogate: S above; call ``.backward()`` (or ``torch.autograd.grad``) on it.
      upper: f(x, y), detached.
      lower_y: g(x, y), detached.
      lower_z: g(x, z), detached.
      gap: g(x, y) − g(x, z) ≥ 0 at the exact inner solutions, detached.
      psi: Ψ_α = f + α·gap, detached.
    """

    surrogate: Tensor
    upper: Tensor
    lower_y: Tensor
    lower_z: Tensor
    gap: Tensor
    psi: Tensor


def _check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t.detach()).all()):
        raise FloatingPointError(f"{name} is not finite: {t.detach().flatten()[:8].tolist()}")


def penalty_surrogate(
    x: Tensor,
    upper: Tensor,
    features_y: Tensor,
    features_z: Tensor,
    combine: Combine,
    alpha: float,
) -> PenaltyTerms:
    """Build S, whose gradient w.r.t. (x, y, z) is the ScaleBiO descent direction (d_x, d_y, d_z).

    Args:
      x: the upper variable (e.g. the logits θ), a leaf tensor that requires grad.
      upper: f(x, y) as a scalar tensor, attached to y's (and possibly x's) graph.
      features_y: H(y), attached to y's graph.
      features_z: H(z), attached to z's graph.
      combine: G(x, h), the lower objective as a function of x and the features; g = G(x, H(·)).
      alpha: penalty α > 0.

    Returns:
      :class:`PenaltyTerms`. Raises FloatingPointError naming the first non-finite input.
    """
    if not (isinstance(alpha, (int, float)) and alpha > 0 and alpha < float("inf")):
        raise ValueError(f"alpha: the penalty must be a finite number > 0, got {alpha!r}")
    if features_y.shape != features_z.shape:
        raise ValueError(
            f"features_z: shape {tuple(features_z.shape)} differs from features_y "
            f"{tuple(features_y.shape)}; both copies must report the same lower features"
        )
    _check_finite("upper loss f(x, y)", upper)
    _check_finite("lower features H(y)", features_y)
    _check_finite("lower features H(z)", features_z)
    g_y = combine(x, features_y)
    g_z_for_x = combine(x, features_z.detach())  # carries −α ∇_x g(x, z) to x
    g_z_for_z = combine(x.detach(), features_z)  # carries +α ∇_z g(x, z) to z
    surrogate = upper + alpha * (g_y - g_z_for_x + g_z_for_z)
    gap = (g_y - g_z_for_z).detach()
    return PenaltyTerms(
        surrogate=surrogate,
        upper=upper.detach(),
        lower_y=g_y.detach(),
        lower_z=g_z_for_z.detach(),
        gap=gap,
        psi=upper.detach() + alpha * gap,
    )


def weighted_sum(weights: Tensor, losses: Tensor) -> Tensor:
    """G(π, h) = Σ_k π_k h_k — the lower objective of data reweighting, given weights π."""
    if weights.shape != losses.shape:
        raise ValueError(
            f"losses: got shape {tuple(losses.shape)} for {tuple(weights.shape)} weights; "
            "pass one mean loss per source (or per example)"
        )
    return (weights * losses.to(weights.dtype)).sum()
