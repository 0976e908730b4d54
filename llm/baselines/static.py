"""Baselines without training: the uniform mixture and the size-proportional mixture."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def uniform_weights(num_sources: int) -> Tensor:
    """π_k = 1/K for every source."""
    if not isinstance(num_sources, int) or num_sources < 1:
        raise ValueError(f"num_sources: a positive integer is required, got {num_sources!r}")
    return torch.full((num_sources,), 1.0 / num_sources, dtype=torch.float64)


def size_weights(sizes: Sequence[int]) -> Tensor:
    """π_k = n_k / Σ_j n_j, with n_k the usable (tokenised, not dropped) examples of source k."""
    n = torch.as_tensor(list(sizes), dtype=torch.float64)
    if n.dim() != 1 or n.numel() == 0 or bool((n <= 0).any()):
        raise ValueError(f"sizes: a non-empty list of positive example counts is required, "
                         f"got {list(sizes)!r}")
    return n / n.sum()
