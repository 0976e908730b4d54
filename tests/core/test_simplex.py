"""Invariants of ``scalebio.simplex``: on the simplex, constraints, prior, Jacobian, mirror step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from scalebio.simplex import check_on_simplex, init_logits, make_simplex, weights

SIMPLEX_TOL = 1e-12  # float64 round-off of a K-term sum and the floor/cap affine maps
FD_EPS = 1e-4  # central differences in float64 (style guide 12b)
FD_TOL = 1e-7  # softmax's third derivative is ≤ 1, so eps² truncation ≈ 1e-9, well inside 1e-7
BISECT_TOL = 1e-12  # the bisection reference for c in min(cap, c·p) is run to ~1e-15


@st.composite
def constrained_specs(draw):
    """A feasible spec: K ∈ [2, 6], optional pinned source, floors and caps around 1/K."""
    k = draw(st.integers(min_value=2, max_value=6))
    fixed = draw(st.one_of(st.none(), st.floats(min_value=0.0, max_value=0.5)))
    free_mass = 1.0 - (fixed or 0.0)
    num_free = k - (fixed is not None)
    share = free_mass / num_free
    floor = draw(st.floats(min_value=0.0, max_value=0.9 * share))
    cap = draw(st.floats(min_value=min(1.0, 1.05 * share), max_value=1.0))
    geometry = draw(st.sampled_from(["softmax", "mirror"]))
    spec = make_simplex(k, geometry=geometry, floor=floor, cap=cap,
                        fixed=None if fixed is None else {k - 1: fixed})
    logits = draw(st.lists(st.floats(min_value=-30, max_value=30), min_size=k, max_size=k))
    return spec, torch.tensor(logits, dtype=torch.float64)


@settings(max_examples=200)
@given(case=constrained_specs())
def test_weights_are_on_the_simplex_and_respect_floor_cap_fixed(case):
    spec, logits = case
    w = weights(logits, spec)
    assert float(w.min()) >= -SIMPLEX_TOL
    assert abs(float(w.sum()) - 1.0) <= SIMPLEX_TOL
    pinned = ~torch.isnan(spec.fixed)  # floor/cap bind the free sources; pinned ones are pinned
    assert bool((w[~pinned] >= spec.floor[~pinned] - SIMPLEX_TOL).all()), (w, spec.floor)
    assert bool((w[~pinned] <= spec.cap[~pinned] + SIMPLEX_TOL).all()), (w, spec.cap)
    assert_close(w[pinned], spec.fixed[pinned], rtol=0, atol=SIMPLEX_TOL)
    check_on_simplex(w)


def _capped_reference(p: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """min(cap, c·p) with Σ = 1, c found by bisection (Σ min(cap, c·p) is increasing in c)."""
    lo, hi = 0.0, 1.0
    while np.minimum(cap, hi * p).sum() < 1 and hi < 2.0**80:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.minimum(cap, mid * p).sum() < 1 else (lo, mid)
    return np.minimum(cap, hi * p)


@settings(max_examples=100)
@given(k=st.integers(min_value=2, max_value=6), data=st.data())
def test_caps_equal_the_closed_form_kl_projection(k, data):
    """With caps only, π = min(cap, c·softmax(θ)): the KL projection of softmax(θ) onto the caps."""
    caps = np.array(data.draw(st.lists(st.floats(min_value=0.05, max_value=0.6), min_size=k,
                                       max_size=k)))
    if caps.sum() < 1:  # make it feasible, Σcap ≥ 1 (the 1e-9 absorbs the division's round-off)
        caps = np.minimum(1.0, caps / caps.sum() * (1 + 1e-9))
    logits = torch.tensor(data.draw(st.lists(st.floats(min_value=-5, max_value=5), min_size=k,
                                             max_size=k)), dtype=torch.float64)
    w = weights(logits, make_simplex(k, cap=caps.tolist()))
    expected = _capped_reference(torch.softmax(logits, 0).numpy(), caps)
    np.testing.assert_allclose(w.numpy(), expected, rtol=0, atol=BISECT_TOL)


def test_capped_entries_stay_capped_regression():
    """Water-filling bug (fixed): an entry capped in round 1 must not receive excess in round 2."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    w = weights(p.log(), make_simplex(3, cap=[0.4, 0.35, 1.0]))
    assert_close(w, torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64))  # c = 2.5 by hand
    # softmax underflow: every uncapped p is 0; the free mass is still handed out (sum stays 1)
    w = weights(torch.tensor([500.0, -500.0], dtype=torch.float64), make_simplex(2, cap=[0.5, 0.6]))
    assert_close(w.sum(), torch.ones((), dtype=torch.float64))
    assert float(w[0]) == 0.5


def test_prior_at_zero_logits():
    spec = make_simplex(4, prior=[1.0, 2.0, 3.0, 4.0])
    assert_close(weights(init_logits(spec, torch.float64), spec),
                 torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    assert_close(weights(torch.zeros(3, dtype=torch.float64), make_simplex(3)),
                 torch.full((3,), 1 / 3, dtype=torch.float64))
    w32 = weights(init_logits(spec), spec)  # float32 by default, dtype preserved
    assert w32.dtype == torch.float32


def test_softmax_jacobian_matches_central_differences_and_closed_form():
    spec = make_simplex(5, prior=[1.0, 1.0, 2.0, 3.0, 5.0])
    theta = torch.tensor([0.3, -1.2, 0.5, 2.0, -0.4], dtype=torch.float64)
    pi = weights(theta, spec)
    auto = torch.autograd.functional.jacobian(lambda t: weights(t, spec), theta)
    eye = torch.eye(5, dtype=torch.float64)
    fd = torch.stack([weights(theta + FD_EPS * e, spec) - weights(theta - FD_EPS * e, spec)
                      for e in eye], 1) / (2 * FD_EPS)
    assert_close(auto, torch.diag(pi) - torch.outer(pi, pi))  # J(π) = diag(π) − ππᵀ
    assert_close(auto, fd, rtol=FD_TOL, atol=FD_TOL)


def test_mirror_sgd_step_is_the_exponentiated_gradient_update():
    """θ ← θ − η ∇ (torch.optim.SGD) with the mirror geometry gives π ∝ π · exp(−η ∇_π L)."""
    spec = make_simplex(4, geometry="mirror")
    theta = torch.tensor([0.2, -0.5, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    eta = 0.3

    def loss(p):
        return c @ p + (p**2).sum()

    pi = weights(theta, spec).detach()
    grad_pi = c + 2 * pi  # ∇_π L at π
    opt = torch.optim.SGD([theta], lr=eta)
    loss(weights(theta, spec)).backward()
    assert_close(theta.grad, grad_pi)  # the logits receive ∇_π itself
    opt.step()
    eg = pi * torch.exp(-eta * grad_pi)
    assert_close(weights(theta.detach(), spec), eg / eg.sum())


def test_bad_arguments_raise_naming_the_argument():
    for kwargs, name in [({"num_sources": 0}, "num_sources"),
                         ({"num_sources": 3, "geometry": "sparsemax"}, "geometry"),
                         ({"num_sources": 3, "prior": [1.0, 0.0, 1.0]}, "prior"),
                         ({"num_sources": 3, "prior": [1.0, 1.0]}, "prior"),
                         ({"num_sources": 3, "floor": 0.5}, "floor"),
                         ({"num_sources": 3, "cap": 0.2}, "cap"),
                         ({"num_sources": 3, "floor": 0.5, "cap": 0.4}, "floor/cap"),
                         ({"num_sources": 3, "fixed": {3: 0.1}}, "fixed"),
                         ({"num_sources": 3, "fixed": {0: 0.7, 1: 0.6}}, "fixed")]:
        with pytest.raises(ValueError, match=name):
            make_simplex(**kwargs)
    with pytest.raises(ValueError, match="logits"):
        weights(torch.zeros(2), make_simplex(3))
    with pytest.raises(ValueError, match="mix"):
        check_on_simplex(torch.tensor([0.5, 0.6]), "mix")
