"""scalebio — learn data-mixture weights by fully first-order bilevel optimization (ScaleBiO).

Notation (paper → code):

=========================  ============================  ==========================================
paper                      code                          meaning
=========================  ============================  ==========================================
λ (logits), θ in the code  ``x``, ``logits``             upper variable
π = softmax(λ)             ``weights(x, spec)``          mixture weights on the simplex
w                          ``y``                         model pulled by validation + α·training
u                          ``z``                         model that tracks the lower solution
α                          ``alpha``                     penalty
L_val(w)                   ``upper`` f(x, y)             upper objective
L_tr(w; λ)                 ``lower`` g(x, y) = G(x, H(y)) lower objective, H = per-source losses
Ψ_α                        ``psi``                       f + α[g(x, y) − g(x, z)]
τ                          ``geometric_alpha(tau, …)``   penalty growth factor
=========================  ============================  ==========================================

The update equations live in :mod:`scalebio.penalty` and nowhere else.
"""

from .penalty import PenaltyTerms, penalty_surrogate, weighted_sum
from .problem import BilevelProblem, generic_problem, reweighting_problem
from .run import RunResult, run
from .schedules import constant_alpha, geometric_alpha
from .simplex import SimplexSpec, check_on_simplex, init_logits, make_simplex, weights
from .solver import ScaleBiOConfig, ScaleBiOState, StepMetrics, adamw, evaluate, init, sgd, step

__all__ = [
    "BilevelProblem",
    "PenaltyTerms",
    "RunResult",
    "ScaleBiOConfig",
    "ScaleBiOState",
    "SimplexSpec",
    "StepMetrics",
    "adamw",
    "check_on_simplex",
    "constant_alpha",
    "evaluate",
    "generic_problem",
    "geometric_alpha",
    "init",
    "init_logits",
    "make_simplex",
    "penalty_surrogate",
    "reweighting_problem",
    "run",
    "sgd",
    "step",
    "weighted_sum",
    "weights",
]
__version__ = "0.1.0"
