"""Two-timescale u updates (K = inner_steps_z): the claim, its references and a planted failure."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from scalebio.solver import ScaleBiOConfig, init, sgd, step
from scalebio.theory import claims_tracking
from scalebio.toy_problems.quadratic import make_quadratic, penalty_minimiser

# A 3×3 float64 solve with condition ≲ 1e3: the closed-form gradient vanishes to ~1e-13.
GRAD_TOL = 1e-10
# K·t = 30 products of a 5×5 contraction in float64: agreement to ~1e-15 relative.
CONTRACTION_TOL = 1e-12


def _toy(seed: int = 0):
    return make_quadratic(seed=seed, **claims_tracking.TOY)


@pytest.mark.parametrize("alpha", [1.0, 10.0, 1e3, 1e5])
def test_penalty_minimiser_zeroes_the_closed_form_penalty_gradient(alpha):
    """Two implementations: the minimiser's normal equations vs ∇Ψ*_α = ρx + αBᵀ(y* − y_α)."""
    toy = _toy(3)
    x_alpha = penalty_minimiser(toy, alpha)
    assert float(toy.grad_penalty(x_alpha, alpha).norm()) <= GRAD_TOL
    # O(1/α): α‖x_α − x*‖ settles to a constant (changes by < 1% from α = 1e3 to 1e5)
    if alpha == 1e5:
        far = 1e3 * float((penalty_minimiser(toy, 1e3) - toy.x_min).norm())
        assert abs(alpha * float((x_alpha - toy.x_min).norm()) / far - 1) < 1e-2


def test_penalty_minimiser_refuses_a_toy_without_ridge():
    toy = make_quadratic(3, 5, 0.5, 2.0, 0, rho=0.0)
    with pytest.raises(ValueError, match="rho"):
        penalty_minimiser(toy, 10.0)


@pytest.mark.parametrize("k", [1, 3])
def test_u_steps_contract_like_the_closed_form(k):
    """x frozen, no noise: u − y*(x) = (I − hA)^{K t}(u_0 − y*(x)), h = η_u α (d_u = α∇_u g)."""
    toy, alpha, lr_u, steps = _toy(), 10.0, 0.02, 10
    config = ScaleBiOConfig(alpha=alpha, opt_x=sgd(0.0), opt_y=sgd(lr_u), opt_z=sgd(lr_u),
                            inner_steps_z=k)
    state = init(toy.problem, toy.x0, toy.y0, config)
    for _ in range(steps):
        state, _ = step(toy.problem, state, config, None)
    target = toy.y_star(toy.x0)
    contraction = torch.eye(5, dtype=torch.float64) - lr_u * alpha * toy.A
    expected = torch.linalg.matrix_power(contraction, k * steps) @ (toy.y0 - target)
    assert_close(state.z.detach() - target, expected, rtol=CONTRACTION_TOL, atol=CONTRACTION_TOL)


def _spectral_radius(toy, alpha: float, lr_x: float, k: int) -> float:
    """ρ of the noise-free step, an affine map of (x, w, u): its Jacobian from unit moves."""
    config = ScaleBiOConfig(alpha=alpha, opt_x=sgd(lr_x), opt_y=sgd(0.2 / alpha),
                            opt_z=sgd(0.2 / alpha), inner_steps_z=k)

    def step_map(v):
        state = init(toy.problem, v[:3], v[3:8], config, z0=v[8:])
        state, _ = step(toy.problem, state, config, None)
        return torch.cat([state.x.detach(), state.y.detach(), state.z.detach()])

    zero = torch.zeros(13, dtype=torch.float64)
    base = step_map(zero)
    jac = torch.stack([step_map(e) - base for e in torch.eye(13, dtype=torch.float64)], 1)
    return float(torch.linalg.eigvals(jac).abs().max())


def test_extra_u_steps_need_an_upper_step_that_shrinks_like_one_over_alpha():
    """README "Two timescales": K = 1 is stable at η_x = 0.3 for every α; K = 2 is not at
    α = 100 (the extra u steps feed α·(w's lag) into d_x), and is again at η_x = 1/α."""
    toy = _toy()
    for alpha in (10.0, 100.0):
        assert _spectral_radius(toy, alpha, 0.3, 1) < 0.95
        assert _spectral_radius(toy, alpha, 1.0 / alpha, 2) < 1.0
    assert _spectral_radius(toy, 100.0, 0.3, 2) > 10.0


@pytest.fixture(scope="module")
def quick_claims():
    return claims_tracking.run_claims(quick=True)


def test_quick_two_timescale_claims_pass(quick_claims):
    tracking, limit = quick_claims
    assert tracking.passed and tracking.measured >= claims_tracking.TRACKING_FACTOR
    assert limit.passed and limit.measured <= claims_tracking.BIAS_BAND
    # the run's α·bias against the closed form α‖x_α − x*‖ (REACH_TOL of the bias apart)
    toy, s = _toy(), limit.series
    for a, err in zip(s["alpha"], s["error"]):
        reference = float((penalty_minimiser(toy, a) - toy.x_min).norm())
        assert abs(err / reference - 1) <= claims_tracking.REACH_TOL
    assert -1.1 <= s["slope"] <= -0.9


def test_frozen_u_fails_both_claims():
    """Planted failure: u never moves, so it cannot track y*(λ) and the limit point is lost."""
    tracking, limit = claims_tracking.run_claims(quick=True, u_lr_scale=0.0)
    assert not tracking.passed
    assert not limit.passed
