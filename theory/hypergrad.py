"""Exact (second-order) reference hypergradients for any :class:`scalebio.BilevelProblem`.

These are the yardsticks the first-order ScaleBiO directions are measured against:

* :func:`solve_lower` — y*(x) = argmin_y g(x, y) by damped Newton in float64 (machine precision).
* :func:`solve_penalized` — y_α(x) = argmin_y f(x, y) + α g(x, y), same solver.
* :func:`exact_hypergradient` — the implicit-function-theorem hypergradient

      ∇Φ(x) = ∇_x f − ∇²_{xy} g · (∇²_{yy} g)^{-1} ∇_y f        at y = y*(x),

  with a dense Hessian solve (small d) or conjugate gradients on Hessian-vector products.
* :func:`penalty_hypergradient` — the exact gradient of the penalised value function
  Ψ*_α(x) = min_y max_z Ψ_α(x, y, z) = f(x, y_α) + α [g(x, y_α) − g(x, y*)]:

      ∇Ψ*_α(x) = ∇_x f(x, y_α) + α [∇_x g(x, y_α) − ∇_x g(x, y*)]

  (Danskin: y_α and y* are the unique optimal responses, so only the explicit x-dependence
  counts). It is obtained from :func:`scalebio.penalty.penalty_surrogate`, the single home of the
  sign convention, evaluated at (x, y_α, y*).

Here g(x, y) = problem.combine(x, problem.features(y, batch), batch) and
f(x, y) = problem.upper(x, y, batch); y must be a plain tensor (any shape).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from scalebio.penalty import penalty_surrogate
from scalebio.problem import BilevelProblem

SOLVES = ("dense", "cg")
_NEWTON_XTOL = 1e-13  # relative Newton step at which a float64 iterate is at ~machine precision
_ARMIJO = 1e-4  # sufficient-decrease fraction of the Newton line search


def lower_value(problem: BilevelProblem, x: Tensor, y: Tensor, batch: Any = None) -> Tensor:
    """g(x, y) = G(x, H(y, batch), batch)."""
    return problem.combine(x, problem.features(y, batch), batch)


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.numel() == 0:
        raise ValueError(f"{name}: must be non-empty, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains non-finite entries")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0 < alpha < float("inf")):
        raise ValueError(f"alpha: the penalty must be a finite number > 0, got {alpha!r}")


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def _dense_hessian(grad: Tensor, wrt: Tensor) -> Tensor:
    """Rows of the Hessian by one backward pass each (d is small wherever this is used)."""
    flat = grad.reshape(-1)
    rows = [torch.autograd.grad(flat[i], wrt, retain_graph=True)[0].reshape(-1)
            for i in range(flat.numel())]
    return torch.stack(rows)


def _newton(objective, y0: Tensor, max_iter: int, what: str) -> Tensor:
    """Damped Newton with Armijo backtracking for a strongly convex ``objective(y)``."""
    y = y0.detach().clone()
    # Lower dtypes stop at a proportionally coarser step (their rounding floor).
    xtol = max(_NEWTON_XTOL, 500 * torch.finfo(y.dtype).eps)
    for _ in range(max_iter):
        yl = _leaf(y)
        val = objective(yl)
        (grad,) = torch.autograd.grad(val, yl, create_graph=True)
        hess = _dense_hessian(grad, yl)
        chol, info = torch.linalg.cholesky_ex(0.5 * (hess + hess.T))
        if int(info) != 0:
            raise ValueError(
                f"{what}: the Hessian is not positive definite at the current iterate; the "
                "objective must be strongly convex in y (for the penalised problem, raise alpha)"
            )
        g = grad.detach().reshape(-1, 1)
        step = -torch.cholesky_solve(g, chol).reshape(y.shape)
        slope = float((g.reshape(-1) * step.reshape(-1)).sum())
        t, v0 = 1.0, float(val.detach())
        # Accept when the decrease is sufficient or lost in rounding (near the optimum).
        while t > 1e-10:
            v = float(objective(y + t * step))
            if v <= v0 + _ARMIJO * t * slope + 1e-15 * abs(v0):
                break
            t *= 0.5
        y = y + t * step
        if float(step.norm()) <= xtol * (1.0 + float(y.norm())):
            return y.detach()
    raise RuntimeError(f"{what}: Newton did not converge in {max_iter} iterations")


def solve_lower(problem: BilevelProblem, x: Tensor, y0: Tensor, batch: Any = None,
                max_iter: int = 100) -> Tensor:
    """Reference inner solve y*(x) = argmin_y g(x, y) to machine precision.

    Args:
      problem: the bilevel problem; g must be strongly convex in y.
      x: upper variable.
      y0: starting point (its shape and dtype define y's).
      batch: passed to the problem's callables.
      max_iter: Newton iterations before giving up.

    Returns:
      y*(x), detached, shaped like ``y0``. Raises RuntimeError if Newton fails to converge.
    """
    _check_tensor("x", x)
    _check_tensor("y0", y0)
    xd = x.detach()
    return _newton(lambda y: lower_value(problem, xd, y, batch), y0, max_iter, "solve_lower")


def solve_penalized(problem: BilevelProblem, x: Tensor, alpha: float, y0: Tensor,
                    batch: Any = None, max_iter: int = 100) -> Tensor:
    """y_α(x) = argmin_y f(x, y) + α g(x, y), by the same Newton solver as :func:`solve_lower`.

    Args:
      problem: the bilevel problem; f + α g must be strongly convex in y.
      x: upper variable.
      alpha: penalty α > 0.
      y0: starting point (y*(x) is a good one).
      batch: passed to the problem's callables.
      max_iter: Newton iterations before giving up.
    """
    _check_alpha(alpha)
    _check_tensor("x", x)
    _check_tensor("y0", y0)
    xd = x.detach()

    def objective(y):
        return problem.upper(xd, y, batch) + alpha * lower_value(problem, xd, y, batch)

    return _newton(objective, y0, max_iter, "solve_penalized")


def _conjugate_gradient(hvp, rhs: Tensor, tol: float, max_iter: int) -> Tensor:
    """Solve H v = rhs for symmetric positive definite H given only v ↦ H v."""
    v = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = float((r * r).sum())
    stop = (tol * float(rhs.norm())) ** 2
    for _ in range(max_iter):
        if rr <= stop:
            return v
        hp = hvp(p)
        step = rr / float((p * hp).sum())
        v = v + step * p
        r = r - step * hp
        rr_new = float((r * r).sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
    if rr > stop:
        raise RuntimeError(f"cg: residual {rr ** 0.5:.3g} above tolerance after {max_iter} steps")
    return v


def exact_hypergradient(problem: BilevelProblem, x: Tensor, y_star: Tensor, batch: Any = None,
                        solve: str = "dense", cg_tol: float = 1e-13,
                        cg_max_iter: int | None = None) -> Tensor:
    """∇Φ(x) = ∇_x f − ∇²_{xy} g (∇²_{yy} g)⁻¹ ∇_y f at y = y*(x) (implicit function theorem).

    Args:
      problem: the bilevel problem (g strongly convex in y, twice differentiable).
      x: upper variable.
      y_star: the lower solution y*(x) (e.g. from :func:`solve_lower`); the formula is only the
        hypergradient when this is accurate.
      batch: passed to the problem's callables.
      solve: ``"dense"`` (build ∇²_{yy} g, Cholesky solve) or ``"cg"`` (conjugate gradients on
        Hessian-vector products; never forms the Hessian).
      cg_tol: relative residual at which CG stops.
      cg_max_iter: CG iteration cap (default 10·dim(y)).

    Returns:
      ∇Φ(x), detached, shaped like ``x``.
    """
    _check_tensor("x", x)
    _check_tensor("y_star", y_star)
    if solve not in SOLVES:
        raise ValueError(f"solve: expected one of {SOLVES}, got {solve!r}")
    xl, yl = _leaf(x), _leaf(y_star)
    f = problem.upper(xl, yl, batch)
    fx, fy = torch.autograd.grad(f, (xl, yl), allow_unused=True)
    fx = torch.zeros_like(xl) if fx is None else fx
    fy = torch.zeros_like(yl) if fy is None else fy
    g = lower_value(problem, xl, yl, batch)
    (gy,) = torch.autograd.grad(g, yl, create_graph=True)
    if solve == "dense":
        hess = _dense_hessian(gy, yl)
        chol, info = torch.linalg.cholesky_ex(0.5 * (hess + hess.T))
        if int(info) != 0:
            raise ValueError("y_star: ∇²_yy g is not positive definite there; g must be "
                             "strongly convex in y")
        v = torch.cholesky_solve(fy.reshape(-1, 1), chol).reshape(yl.shape)
    else:
        def hvp(p):
            return torch.autograd.grad(gy, yl, grad_outputs=p, retain_graph=True)[0]

        max_iter = cg_max_iter if cg_max_iter is not None else 10 * yl.numel()
        v = _conjugate_gradient(hvp, fy.detach(), cg_tol, max_iter)
    # ∇_x ⟨∇_y g, v⟩ with v held fixed is the mixed product ∇²_{xy} g · v.
    (cross,) = torch.autograd.grad(gy, xl, grad_outputs=v.detach(), allow_unused=True)
    cross = torch.zeros_like(xl) if cross is None else cross
    return (fx - cross).detach()


def penalty_value(problem: BilevelProblem, x: Tensor, alpha: float, y_alpha: Tensor,
                  y_star: Tensor, batch: Any = None) -> Tensor:
    """Ψ*_α(x) = f(x, y_α) + α [g(x, y_α) − g(x, y*)] given the two exact solutions (detached)."""
    _check_alpha(alpha)
    with torch.no_grad():
        xd = x.detach()
        gap = lower_value(problem, xd, y_alpha, batch) - lower_value(problem, xd, y_star, batch)
        return problem.upper(xd, y_alpha, batch) + alpha * gap


def penalty_hypergradient(problem: BilevelProblem, x: Tensor, alpha: float, y0: Tensor,
                          batch: Any = None, y_alpha: Tensor | None = None,
                          y_star: Tensor | None = None) -> Tensor:
    """∇Ψ*_α(x) = ∇_x f(x, y_α) + α [∇_x g(x, y_α) − ∇_x g(x, y*)], with y_α, y* solved exactly.

    The x-gradient is taken of :func:`scalebio.penalty.penalty_surrogate` at (x, y_α, z = y*), so
    the sign convention is the library's own: this is the ScaleBiO direction d_x with both inner
    players at their exact optima.

    Args:
      problem: the bilevel problem.
      x: upper variable.
      alpha: penalty α > 0.
      y0: starting point for the inner solves (ignored for a solution passed in).
      batch: passed to the problem's callables.
      y_alpha, y_star: precomputed exact solutions, to skip the solves.

    Returns:
      ∇Ψ*_α(x), detached, shaped like ``x``.
    """
    _check_alpha(alpha)
    _check_tensor("x", x)
    if y_star is None:
        y_star = solve_lower(problem, x, y0, batch)
    if y_alpha is None:
        y_alpha = solve_penalized(problem, x, alpha, y_star, batch)
    if y_alpha.shape != y_star.shape:
        raise ValueError(f"y_alpha: shape {tuple(y_alpha.shape)} differs from y_star "
                         f"{tuple(y_star.shape)}")
    xl = _leaf(x)
    ya, ys = y_alpha.detach(), y_star.detach()
    terms = penalty_surrogate(
        xl,
        problem.upper(xl, ya, batch),
        problem.features(ya, batch),
        problem.features(ys, batch),
        lambda xx, h: problem.combine(xx, h, batch),
        alpha,
    )
    (dx,) = torch.autograd.grad(terms.surrogate, xl, allow_unused=True)
    return torch.zeros_like(xl) if dx is None else dx.detach()
