"""Strongly convex bilevel toy problems with exact references.

Each factory is seeded and returns a NamedTuple holding the ``scalebio.BilevelProblem``, a start
point, the exact solution (closed form or a float64 reference solver) and the problem's constants:

* :func:`make_quadratic` — quadratic bilevel with lower-level Hessian spectrum in [μ, L].
* :func:`make_logistic_reweighting` — L2-regularised logistic regression over label-noise sources.
* :func:`make_wellspecified_mixture` — K linear-regression sources, validation = known mixture π°.
* :func:`make_misspecified_mixture` — validation outside the sources' family (interior or face).
* ``mixture_stochastic`` — minibatch versions of the mixtures with known gradient variance.
"""

from .logistic import LogisticToy, make_logistic_reweighting
from .mixture import MixtureToy, make_misspecified_mixture, make_wellspecified_mixture
from .quadratic import QuadraticToy, make_quadratic

__all__ = [
    "LogisticToy",
    "MixtureToy",
    "QuadraticToy",
    "make_logistic_reweighting",
    "make_misspecified_mixture",
    "make_quadratic",
    "make_wellspecified_mixture",
]
