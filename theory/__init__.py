"""Closed forms, exact hypergradients and bounds; every claim is checked by a test.

* :mod:`.hypergrad` — the implicit-function-theorem hypergradient ∇Φ and the exact gradient of
  the penalised value function ∇Ψ*_α (reference solvers in float64).
* :mod:`.bounds` — the O(1/α) penalty-bias bound with its constant, descent bounds, slope fits.
* :mod:`.optimality` — reference solver on the simplex and its KKT check.
* ``claims_*`` — the claims behind ``scalebio validate``; see ``theory/README.md`` for the table
  claim → assumptions → formula → test.
"""

from .bounds import log_log_slope, penalty_bias_bound, penalty_bias_constant
from .hypergrad import exact_hypergradient, penalty_hypergradient, solve_lower, solve_penalized

__all__ = [
    "exact_hypergradient",
    "log_log_slope",
    "penalty_bias_bound",
    "penalty_bias_constant",
    "penalty_hypergradient",
    "solve_lower",
    "solve_penalized",
]
