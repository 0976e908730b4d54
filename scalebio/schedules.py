"""Penalty schedules: α_t and the step-size factor that goes with it.

The penalised objective Ψ_α is O(α)-smooth in y, so a stable step size scales as 1/α. A schedule
maps (t, α₀) to (α_t, α₀/α_t); the solver multiplies every base learning rate by the factor.
"""

from __future__ import annotations

from collections.abc import Callable

AlphaSchedule = Callable[[int, float], tuple[float, float]]


def constant_alpha() -> AlphaSchedule:
    """α_t = α₀ for every t (what every released script of the paper runs, τ = 1)."""

    def schedule(t: int, alpha0: float) -> tuple[float, float]:
        return alpha0, 1.0

    return schedule


def geometric_alpha(tau: float, every: int, max_alpha: float | None = None) -> AlphaSchedule:
    """α_t = α₀ · τ^⌊t / every⌋ (capped at ``max_alpha``), learning rates × α₀/α_t.

    This is the paper's outer loop (α ← τα, lr ∝ τ^{-i}) with the α update at the *end* of each
    block of ``every`` steps, so that the first block runs at α₀ itself.
    """
    if not tau >= 1.0:
        raise ValueError(f"tau: the penalty may only grow, need tau ≥ 1, got {tau!r}")
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every: need a positive number of steps, got {every!r}")
    if max_alpha is not None and not max_alpha > 0:
        raise ValueError(f"max_alpha: must be > 0, got {max_alpha!r}")

    def schedule(t: int, alpha0: float) -> tuple[float, float]:
        alpha = alpha0 * tau ** (t // every)
        if max_alpha is not None:
            alpha = min(alpha, max(max_alpha, alpha0))
        return alpha, alpha0 / alpha

    return schedule
