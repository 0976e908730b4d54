"""Bilevel problems as small immutable bundles of callables.

A problem is min_x f(x, y*(x)) with y*(x) = argmin_y g(x, y) and g(x, y) = G(x, H(y)); see
``scalebio.penalty`` for why the lower objective is split into features H and a combiner G.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .penalty import weighted_sum
from .simplex import SimplexSpec, weights

Variable = Tensor | nn.Module


class BilevelProblem(NamedTuple):
    """Callables defining a bilevel problem.

    Attributes:
      upper: f(x, y, batch) → scalar tensor.
      features: H(y, batch) → tensor (the lower features of one copy of y).
      combine: G(x, h, batch) → scalar; the lower objective is g(x, y) = G(x, H(y, batch), batch).
      weights: optional π(x) → simplex weights, set for data reweighting; used for metrics,
        time-averaged weights and the on-simplex check.
    """

    upper: Callable[[Tensor, Any, Any], Tensor]
    features: Callable[[Any, Any], Tensor]
    combine: Callable[[Tensor, Tensor, Any], Tensor]
    weights: Callable[[Tensor], Tensor] | None = None


def generic_problem(
    upper: Callable[[Tensor, Tensor, Any], Tensor],
    lower: Callable[[Tensor, Tensor, Any], Tensor],
) -> BilevelProblem:
    """A bilevel problem with plain tensors x, y and lower objective ``lower(x, y, batch)``.

    The features are the identity, H(y) = y, so G(x, h, batch) = lower(x, h, batch).
    """
    return BilevelProblem(upper=upper, features=lambda y, batch: y, combine=lower)


def reweighting_problem(
    val_loss: Callable[[Variable, Any], Tensor],
    source_losses: Callable[[Variable, Any], Tensor] | Sequence[Callable[[Variable, Any], Tensor]],
    simplex: SimplexSpec,
) -> BilevelProblem:
    """Data reweighting: min_θ L_val(w*(θ)), w*(θ) = argmin_w Σ_k π_k(θ) ℓ̄_k(w).

    Args:
      val_loss: (model, batch) → validation loss L_val (scalar).
      source_losses: either one callable (model, batch) → K per-source mean losses, or a list of
        K callables (model, batch) → ℓ̄_k. One weight per example is the same thing with K = n.
      simplex: the parametrization π(θ) (see ``scalebio.simplex``).
    """
    if callable(source_losses):
        features = source_losses
    else:
        losses = list(source_losses)
        if len(losses) != simplex.num_sources:
            raise ValueError(
                f"source_losses: got {len(losses)} closures for {simplex.num_sources} sources"
            )
        if not losses:
            raise ValueError("source_losses: need at least one source (K = 0)")

        def features(model, batch):
            return torch.stack([torch.as_tensor(f(model, batch)).reshape(()) for f in losses])

    def pi(x):
        return weights(x, simplex)

    def combine(x, h, batch):
        if h.shape != (simplex.num_sources,):
            raise ValueError(
                f"source_losses: returned shape {tuple(h.shape)}, expected ({simplex.num_sources},)"
            )
        return weighted_sum(pi(x), h)

    return BilevelProblem(
        upper=lambda x, y, batch: val_loss(y, batch),
        features=features,
        combine=combine,
        weights=pi,
    )
