"""Mixture-weight baselines that write ScaleBiO's weights.json: uniform, size-proportional,
DoReMi, RHO-LOSS-style and LESS-style (``scalebio baseline --method ...``)."""

from __future__ import annotations

from scalebio.llm.baselines.args import BaselineArgs
from scalebio.llm.baselines.common import scores_to_weights
from scalebio.llm.baselines.doremi import clipped_excess, doremi_update
from scalebio.llm.baselines.less import (
           cosine_scores,
           kronecker_projection,
           source_scores,
           top_p_ids,
)
from scalebio.llm.baselines.rho import reducible_losses, rho_weights
from scalebio.llm.baselines.run import METHODS, run_baseline
from scalebio.llm.baselines.static import size_weights, uniform_weights

__all__ = ["METHODS", "BaselineArgs", "clipped_excess", "cosine_scores", "doremi_update",
           "kronecker_projection", "reducible_losses", "rho_weights", "run_baseline",
           "scores_to_weights", "size_weights", "source_scores", "top_p_ids", "uniform_weights"]
