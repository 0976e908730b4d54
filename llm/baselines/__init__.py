"""Mixture-weight baselines that write ScaleBiO's weights.json: uniform, size-proportional,
DoReMi, RHO-LOSS-style and LESS-style (``scalebio baseline --method ...``)."""

from __future__ import annotations

from .common import BaselineArgs, scores_to_weights
from .doremi import clipped_excess, doremi_update
from .less import cosine_scores, kronecker_projection, source_scores, top_p_ids
from .rho import reducible_losses, rho_weights
from .run import METHODS, run_baseline
from .static import size_weights, uniform_weights

__all__ = ["METHODS", "BaselineArgs", "clipped_excess", "cosine_scores", "doremi_update",
           "kronecker_projection", "reducible_losses", "rho_weights", "run_baseline",
           "scores_to_weights", "size_weights", "source_scores", "top_p_ids", "uniform_weights"]
