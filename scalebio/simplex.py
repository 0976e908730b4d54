"""Parametrizations of the probability simplex for the upper variable.

The upper variable is always a vector of *logits* θ ∈ R^K; the weights are π = weights(θ, spec).
Two geometries share that state:

* ``"softmax"`` (the paper): π = softmax(θ + log prior) and the optimizer sees ∇_θ = J(π)^T ∇_π with
  J(π) = diag(π) − ππ^T, the softmax Jacobian.
* ``"mirror"`` (exponentiated gradient / entropic mirror descent): the optimizer sees ∇_π itself.
  With plain SGD of step η on θ this is exactly π_{t+1} ∝ π_t · exp(−η ∇_π), because softmax is
  shift-invariant and θ are the log-weights up to a constant.

Constraints, applied after the softmax, keep π on the simplex in every case:

* ``prior``   — initial weights (θ = 0 gives π = prior); uniform if omitted.
* ``floor``/``cap`` — per-source bounds, ``floor_k ≤ π_k ≤ cap_k``. π = f + (1 − Σf)·capped(p) where
  capped(p) clips p at the rescaled caps and hands the excess to the uncapped sources in proportion
  (water-filling; at most K rounds, differentiable almost everywhere).
* ``fixed``   — sources whose weight is pinned; the free sources share the remaining mass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

GEOMETRIES = ("softmax", "mirror")
_FEAS_TOL = 1e-9  # slack allowed in Σfloor ≤ 1 ≤ Σcap, to accept user-written decimals like 0.1×10


class SimplexSpec(NamedTuple):
    """How logits θ ∈ R^K become weights π ∈ Δ^K. Build with :func:`make_simplex`."""

    num_sources: int
    geometry: str
    log_prior: Tensor  # (K,) float64
    floor: Tensor  # (K,) float64, 0 where unconstrained
    cap: Tensor  # (K,) float64, 1 where unconstrained
    fixed: Tensor  # (K,) float64, NaN for free sources


def _as_vector(name: str, value, k: int, default: float) -> Tensor:
    if value is None:
        return torch.full((k,), float(default), dtype=torch.float64)
    if isinstance(value, (int, float)):
        return torch.full((k,), float(value), dtype=torch.float64)
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    if t.numel() != k:
        raise ValueError(f"{name}: expected {k} entries (one per source), got {t.numel()}")
    return t


def make_simplex(
    num_sources: int,
    *,
    geometry: str = "softmax",
    prior=None,
    floor=None,
    cap=None,
    fixed: dict[int, float] | None = None,
) -> SimplexSpec:
    """Validate and build a :class:`SimplexSpec`.

    Args:
      num_sources: K ≥ 1.
      geometry: ``"softmax"`` or ``"mirror"`` (see module docstring).
      prior: initial weights, K positive numbers (normalised here); uniform if None.
      floor: lower bound per source (scalar or K values), default 0.
      cap: upper bound per source (scalar or K values), default 1.
      fixed: {source index: weight} for sources whose weight never moves.

    Raises:
      ValueError naming the offending argument when the constraints are infeasible.
    """
    if not isinstance(num_sources, int) or num_sources < 1:
        raise ValueError(f"num_sources: need at least one source, got {num_sources!r}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry: expected one of {GEOMETRIES}, got {geometry!r}")
    k = num_sources
    p = _as_vector("prior", prior, k, 1.0 / k)
    if not torch.isfinite(p).all() or (p <= 0).any():
        raise ValueError(f"prior: every entry must be finite and > 0, got {p.tolist()}")
    p = p / p.sum()
    lo = _as_vector("floor", floor, k, 0.0)
    hi = _as_vector("cap", cap, k, 1.0)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("floor/cap: entries must be finite")
    if (lo < 0).any() or (hi > 1).any() or (lo > hi).any():
        raise ValueError(
            f"floor/cap: need 0 ≤ floor ≤ cap ≤ 1, got floor={lo.tolist()} cap={hi.tolist()}"
        )
    fx = torch.full((k,), math.nan, dtype=torch.float64)
    for i, v in (fixed or {}).items():
        if not (0 <= int(i) < k):
            raise ValueError(f"fixed: source index {i} out of range [0, {k})")
        if not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"fixed: weight of source {i} must be in [0, 1], got {v}")
        fx[int(i)] = float(v)
    free = torch.isnan(fx)
    fixed_mass = float(torch.nan_to_num(fx, nan=0.0).sum())
    if fixed_mass > 1 + _FEAS_TOL:
        raise ValueError(f"fixed: fixed weights sum to {fixed_mass:.6g} > 1")
    if not free.any() and abs(fixed_mass - 1) > _FEAS_TOL:
        raise ValueError(f"fixed: every source is fixed but the weights sum to {fixed_mass:.6g}")
    if free.any():
        rest = 1.0 - fixed_mass
        if float(lo[free].sum()) > rest + _FEAS_TOL:
            raise ValueError(f"floor: floors of free sources sum above the free mass {rest:.6g}")
        if float(hi[free].sum()) < rest - _FEAS_TOL:
            raise ValueError(f"cap: caps of free sources sum below the free mass {rest:.6g}")
    return SimplexSpec(k, geometry, p.log(), lo, hi, fx)


def init_logits(spec: SimplexSpec, dtype=torch.float32) -> Tensor:
    """θ₀ = 0, so that π₀ = the prior (projected onto the constraints)."""
    return torch.zeros(spec.num_sources, dtype=dtype)


class _MirrorSoftmax(torch.autograd.Function):
    """softmax forward; identity backward, so the logits receive ∇_π (entropic mirror step)."""

    @staticmethod
    def forward(ctx, z):
        return torch.softmax(z, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _capped(p: Tensor, cap: Tensor) -> Tensor:
    """Clip p ∈ Δ at cap (Σcap ≥ 1) and hand the excess to the uncapped entries in proportion.

    The result is q = min(cap, c·p) with c such that Σq = 1: a set C of entries sits at its cap and
    the rest share 1 − Σ_C cap in proportion to p. C only grows (an entry once capped stays
    capped), so at most K rounds. If every uncapped p_k is 0 (softmax underflow) they share the
    mass equally instead.
    """
    capped = torch.zeros_like(p, dtype=torch.bool)
    out = p
    for _ in range(p.numel()):
        over = (out > cap) & ~capped
        if not bool(over.any()):
            break
        capped = capped | over
        base = torch.where(capped, torch.zeros_like(p), p)
        if float(base.detach().sum()) <= 0:
            base = (~capped).to(p.dtype)
        rest = 1.0 - torch.where(capped, cap, torch.zeros_like(cap)).sum()
        out = torch.where(capped, cap, rest * base / base.sum())
    return out


def weights(logits: Tensor, spec: SimplexSpec) -> Tensor:
    """π(θ): map logits to simplex weights under ``spec`` (differentiable; dtype of ``logits``).

    π_free = (1 − Σ fixed) · [f̃ + (1 − Σ f̃)·capped(softmax(θ + log prior))], computed over the free
    sources only, with floors and caps f̃, c̃ rescaled to the free mass.
    """
    if logits.ndim != 1 or logits.numel() != spec.num_sources:
        raise ValueError(
            f"logits: expected shape ({spec.num_sources},), got {tuple(logits.shape)}"
        )
    dt, dev = logits.dtype, logits.device
    free = torch.isnan(spec.fixed).to(dev)
    fixed_vals = torch.nan_to_num(spec.fixed, nan=0.0).to(dev, dt)
    rest = 1.0 - float(fixed_vals.sum())
    z = logits[free] + spec.log_prior.to(dev, dt)[free]
    p = _MirrorSoftmax.apply(z) if spec.geometry == "mirror" else torch.softmax(z, dim=-1)
    if rest <= 0:
        return fixed_vals
    lo = spec.floor.to(dev, dt)[free] / rest
    hi = spec.cap.to(dev, dt)[free] / rest
    lo_mass = float(lo.sum())
    if float((hi < 1).sum()) > 0:
        scale = 1.0 - lo_mass
        p = _capped(p, ((hi - lo) / scale).clamp_min(0)) if scale > 0 else torch.zeros_like(p)
    p_free = lo + (1.0 - lo_mass) * p
    out = fixed_vals.clone()
    out[free] = rest * p_free
    return out


def check_on_simplex(w: Tensor, name: str = "weights", atol: float = 1e-6) -> None:
    """Raise ValueError naming ``name`` unless ``w`` is finite, non-negative and sums to 1."""
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty vector, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: non-finite weights {w.tolist()}")
    if (w < -atol).any() or abs(float(w.sum()) - 1.0) > atol:
        raise ValueError(
            f"{name}: left the simplex (min {float(w.min()):.3g}, sum {float(w.sum()):.9g})"
        )
