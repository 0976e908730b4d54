"""The ScaleBiO iteration: apply the directions of ``scalebio.penalty`` with torch.optim optimizers.

State is a NamedTuple returned anew by every :func:`step`. The optimizers inside it are the one
mutable part, because torch.optim updates parameters in place; nothing else is mutated.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .penalty import PenaltyTerms, penalty_surrogate
from .problem import BilevelProblem, Variable
from .schedules import AlphaSchedule, constant_alpha
from .simplex import check_on_simplex

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
ORDERS = ("simultaneous", "alternating")


def sgd(lr: float, momentum: float = 0.0) -> OptimizerFactory:
    """Factory for ``torch.optim.SGD`` with step size ``lr``."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)


def adamw(lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
    """Factory for ``torch.optim.AdamW`` (weight decay 0 by default; docs/method.md, pitfall 8)."""
    return functools.partial(
        torch.optim.AdamW, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )


@dataclass(frozen=True)
class ScaleBiOConfig:
    """Hyperparameters of the iteration.

    Attributes:
      alpha: initial penalty α₀ > 0.
      opt_x, opt_y, opt_z: optimizer factories for the upper variable, y (w) and z (u).
      order: ``"simultaneous"`` (Jacobi, as in the paper's code: all directions at (x_t, y_t, z_t))
        or ``"alternating"`` (z steps first, then x and y use z_{t+1}).
      alpha_schedule: α_t and the learning-rate factor α₀/α_t (see ``scalebio.schedules``).
      clip_x, clip_y, clip_z: max ℓ2 norm of each direction, None for no clipping.
      x_warmup_steps: steps during which only y and z move (λ frozen; the LLM loop calls it
        ``lambda_warmup_steps``). The x step is skipped entirely rather than taken from half the
        gradient (docs/method.md, pitfall 10).
      inner_steps_z: K ≥ 1, the steps z takes per outer step (two timescales; the LLM loop calls
        it ``inner_steps_u``). K − 1 extra z steps on fresh batches come first, then the usual
        step; K = 1 is the single-timescale iteration, bit for bit (equations in :func:`step`).
    """

    alpha: float = 10.0
    opt_x: OptimizerFactory = sgd(0.1)
    opt_y: OptimizerFactory = sgd(0.1)
    opt_z: OptimizerFactory = sgd(0.1)
    order: str = "simultaneous"
    alpha_schedule: AlphaSchedule = constant_alpha()
    clip_x: float | None = None
    clip_y: float | None = None
    clip_z: float | None = None
    x_warmup_steps: int = 0
    inner_steps_z: int = 1

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < float("inf")):
            raise ValueError(f"alpha: the penalty must be a finite number > 0, got {self.alpha!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got {self.order!r}")
        for name in ("clip_x", "clip_y", "clip_z"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}: must be > 0 or None, got {v!r}")
        if self.x_warmup_steps < 0:
            raise ValueError(f"x_warmup_steps: must be ≥ 0, got {self.x_warmup_steps}")
        k = self.inner_steps_z
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"inner_steps_z: need an integer ≥ 1, got {k!r}")


class ScaleBiOState(NamedTuple):
    x: Tensor
    y: Variable
    z: Variable
    opt_x: torch.optim.Optimizer
    opt_y: torch.optim.Optimizer
    opt_z: torch.optim.Optimizer
    base_lrs: tuple[tuple[float, ...], ...]  # per optimizer, per param group, before α scaling
    step: int
    weights_sum: Tensor | None  # Σ_t π_t, for the time-averaged weights


class StepMetrics(NamedTuple):
    """What one step measured, at the iterate it started from (x_t, y_t, z_t)."""

    step: int
    alpha: float
    upper: float  # f(x, y)
    lower_y: float  # g(x, y)
    lower_z: float  # g(x, z)
    gap: float  # g(x, y) − g(x, z)
    psi: float  # Ψ_α
    hypergrad: Tensor  # d_x, the first-order hypergradient estimate (before clipping)
    grad_norm_x: float
    grad_norm_y: float
    grad_norm_z: float
    weights: Tensor | None  # π(x_t)
    avg_weights: Tensor | None  # (1/(t+1)) Σ_{s≤t} π(x_s)


def _params(v: Variable) -> list[Tensor]:
    return [p for p in v.parameters() if p.requires_grad] if isinstance(v, nn.Module) else [v]


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def init(problem: BilevelProblem, x0: Tensor, y0: Variable, config: ScaleBiOConfig,
         z0: Variable | None = None) -> ScaleBiOState:
    """Start the iteration at (x0, y0, z0); z0 defaults to a copy of y0 (u and w start identical).

    Tensors are cloned; an ``nn.Module`` y0 is used as is (its parameters are trained in place)
    and z0 defaults to ``copy.deepcopy(y0)``.
    """
    if not isinstance(x0, Tensor) or x0.numel() == 0:
        raise ValueError("x0: the upper variable must be a non-empty tensor")
    x = _leaf(x0)
    if isinstance(y0, nn.Module):
        y = y0
        z = z0 if z0 is not None else copy.deepcopy(y0)
    else:
        y = _leaf(y0)
        z = _leaf(z0 if z0 is not None else y0)
    if isinstance(z, Tensor) and isinstance(y, Tensor) and z.shape != y.shape:
        raise ValueError(f"z0: shape {tuple(z.shape)} differs from y0 {tuple(y.shape)}")
    opts = (config.opt_x([x]), config.opt_y(_params(y)), config.opt_z(_params(z)))
    base = tuple(tuple(g["lr"] for g in o.param_groups) for o in opts)
    return ScaleBiOState(x, y, z, *opts, base_lrs=base, step=0, weights_sum=None)


def evaluate(problem: BilevelProblem, x: Tensor, y: Variable, z: Variable, batch: Any,
             alpha: float) -> PenaltyTerms:
    """Penalty terms at (x, y, z): the one place the solver forms the surrogate."""
    return penalty_surrogate(
        x,
        problem.upper(x, y, batch),
        problem.features(y, batch),
        problem.features(z, batch),
        lambda xx, h: problem.combine(xx, h, batch),
        alpha,
    )


def _grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _norm(gs: list[Tensor]) -> float:
    # per-tensor norms in the tensor's own dtype (no float64 copy of large vectors), then combined
    return float(sum(float(torch.linalg.vector_norm(g)) ** 2 for g in gs)) ** 0.5


def _apply(opt: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor],
           clip: float | None, norm: float) -> None:
    scale = min(1.0, clip / (norm + 1e-12)) if clip is not None else 1.0
    for p, g in zip(params, grads):
        p.grad = g.detach() if scale == 1.0 else g.detach() * scale
    opt.step()
    opt.zero_grad(set_to_none=True)


def step(problem: BilevelProblem, state: ScaleBiOState, config: ScaleBiOConfig,
         batch: Any = None, inner_batches: Sequence[Any] | None = None,
         ) -> tuple[ScaleBiOState, StepMetrics]:
    """One ScaleBiO iteration (see ``scalebio.penalty`` for the equations).

    Simultaneous: (d_x, d_y, d_z) all at (x_t, y_t, z_t). Alternating: z_{t+1} from d_z at
    (x_t, y_t, z_t), then d_x, d_y at (x_t, y_t, z_{t+1}). Learning rates are scaled by α₀/α_t.

    Two timescales (``config.inner_steps_z`` = K > 1): z first takes K − 1 extra steps on the
    fresh ``inner_batches`` ξ_1 … ξ_{K−1} (default: ``batch`` again, for deterministic problems),
    at fixed (x_t, y_t),

        z_t^{(i)} = z_t^{(i−1)} − η_z d_z(x_t, z_t^{(i−1)}; ξ_i),   i = 1 … K − 1,

    then the step above runs from (x_t, y_t, z_t^{(K−1)}) on ``batch`` and gives z its K-th step.
    So d_x uses z after K − 1 steps (simultaneous) or after all K (alternating); the metrics are
    measured at (x_t, y_t, z_t^{(K−1)}). With x warm-up, x stays at x_t while
    t < ``x_warmup_steps``.
    """
    k = config.inner_steps_z
    if inner_batches is None:
        inner_batches = [batch] * (k - 1)
    elif len(inner_batches) != k - 1:
        raise ValueError(f"inner_batches: need inner_steps_z − 1 = {k - 1} batches, "
                         f"got {len(inner_batches)}")
    alpha, lr_factor = config.alpha_schedule(state.step, config.alpha)
    for opt, base in zip((state.opt_x, state.opt_y, state.opt_z), state.base_lrs):
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * lr_factor
    px, py, pz = [state.x], _params(state.y), _params(state.z)
    for extra in inner_batches:  # z's extra steps: only its own direction d_z is applied
        dz = _grads(evaluate(problem, state.x, state.y, state.z, extra, alpha).surrogate, pz)
        _apply(state.opt_z, pz, dz, config.clip_z, _norm(dz))
    terms = evaluate(problem, state.x, state.y, state.z, batch, alpha)
    dz = _grads(terms.surrogate, pz)
    nz = _norm(dz)
    if config.order == "alternating":
        _apply(state.opt_z, pz, dz, config.clip_z, nz)
        terms_after = evaluate(problem, state.x, state.y, state.z, batch, alpha)
        dx, dy = _grads(terms_after.surrogate, px), _grads(terms_after.surrogate, py)
    else:
        dx, dy = _grads(terms.surrogate, px), _grads(terms.surrogate, py)
    nx, ny = _norm(dx), _norm(dy)

    pi = problem.weights(state.x).detach() if problem.weights is not None else None
    if pi is not None:
        check_on_simplex(pi, "weights π(x)")
    wsum = None if pi is None else (pi if state.weights_sum is None else state.weights_sum + pi)
    metrics = StepMetrics(
        step=state.step, alpha=alpha, upper=float(terms.upper), lower_y=float(terms.lower_y),
        lower_z=float(terms.lower_z), gap=float(terms.gap), psi=float(terms.psi),
        hypergrad=dx[0].detach().clone(), grad_norm_x=nx, grad_norm_y=ny,
        grad_norm_z=nz, weights=pi,
        avg_weights=None if wsum is None else wsum / (state.step + 1),
    )
    if config.order == "simultaneous":
        _apply(state.opt_z, pz, dz, config.clip_z, nz)
    _apply(state.opt_y, py, dy, config.clip_y, ny)
    if state.step >= config.x_warmup_steps:
        _apply(state.opt_x, px, dx, config.clip_x, nx)
    return state._replace(step=state.step + 1, weights_sum=wsum), metrics
