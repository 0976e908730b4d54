"""A convenience loop over :func:`scalebio.solver.step` with a progress bar and a history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .problem import BilevelProblem
from .solver import ScaleBiOConfig, ScaleBiOState, StepMetrics, init, step


class RunResult(NamedTuple):
    state: ScaleBiOState
    history: list[StepMetrics]

    @property
    def weights(self) -> torch.Tensor | None:
        """Final weights π(x_T) (None for problems without a simplex)."""
        return self.history[-1].weights if self.history else None

    @property
    def avg_weights(self) -> torch.Tensor | None:
        return self.history[-1].avg_weights if self.history else None


def run(
    problem: BilevelProblem,
    x0: torch.Tensor,
    y0,
    config: ScaleBiOConfig,
    num_steps: int,
    batches: Callable[[int], Any] | None = None,
    progress: bool = True,
    desc: str = "scalebio",
) -> RunResult:
    """Run ``num_steps`` ScaleBiO steps from (x0, y0); ``batches(t)`` supplies the t-th batch.

    Returns the final state and the per-step metrics. The last entry's ``weights`` are π(x_{T-1}),
    the weights at which the last step was evaluated; ``problem.weights(state.x)`` gives π(x_T).
    """
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps: need a positive integer, got {num_steps!r}")
    state = init(problem, x0, y0, config)
    history = []
    bar = tqdm(range(num_steps), desc=desc, disable=not progress, leave=False)
    for t in bar:
        state, m = step(problem, state, config, None if batches is None else batches(t))
        history.append(m)
        if progress and t % max(1, num_steps // 50) == 0:
            bar.set_postfix(f=f"{m.upper:.3g}", gap=f"{m.gap:.2g}")
    return RunResult(state, history)
