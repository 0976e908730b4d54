"""RHO-LOSS-style source weights (Mindermann et al., 2022), per source instead of per point.

A reference ("irreducible loss") model is trained on the validation data; a training model is
trained on the uniform mixture (same init, same number of steps). On the first ``max_examples``
examples of each source k, the reducible loss is

    r_k = mean_i ℓ_i^train − mean_i ℓ_i^ref,

high where the validation distribution finds the data learnable but the mixture has not learned
it yet. Weights: ``softmax`` π = softmax(r / T) (default T = 1), or ``positive``
π ∝ max(r, 0) (uniform if no r_k > 0); see :func:`..common.scores_to_weights`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scalebio.llm.baselines.common import scores_to_weights


def reducible_losses(train_losses: list[Tensor], ref_losses: list[Tensor]) -> Tensor:
    """r_k = mean(train_losses[k]) − mean(ref_losses[k]), one pair of per-example tensors per
    source (the same examples, in the same order)."""
    if len(train_losses) != len(ref_losses) or not train_losses:
        raise ValueError(f"ref_losses: expected {len(train_losses)} per-source tensors, "
                         f"got {len(ref_losses)}")
    r = []
    for k, (a, b) in enumerate(zip(train_losses, ref_losses)):
        if a.shape != b.shape or a.numel() == 0:
            raise ValueError(f"source {k}: train and reference losses need the same non-empty "
                             f"shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        r.append(a.double().mean() - b.double().mean())
    return torch.stack(r)


def rho_weights(train_losses: list[Tensor], ref_losses: list[Tensor], rule: str = "softmax",
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(weights, reducible losses r) by the rule of the module docstring."""
    r = reducible_losses(train_losses, ref_losses)
    return scores_to_weights(r, rule, temperature), r
