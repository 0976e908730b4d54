"""The record every validation claim produces, and the JSON/markdown report built from them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Claim:
    """One checked claim.

    Attributes:
      name: short id, e.g. ``"penalty_bias_O(1/alpha)"``.
      problem: which toy it was measured on, e.g. ``"quadratic(d=20,kappa=10)"``.
      measured: the measured number (error, slope, distance, …).
      bound: the number it is compared with (the bound, or the edge of the accepted band).
      passed: whether the comparison holds (the comparison itself lives in the claim function).
      detail: one sentence: the comparison made and the tolerance with its reason.
      series: optional data for plots, e.g. {"kind": "bias_vs_alpha", "alpha": [...], ...}.
    """

    name: str
    problem: str
    measured: float
    bound: float
    passed: bool
    detail: str = ""
    series: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "problem": self.problem,
            "measured": float(self.measured),
            "bound": float(self.bound),
            "passed": bool(self.passed),
            "detail": self.detail,
        }
