"""Property tests of ScaleBiO on random mixture instances (hypothesis, "ci" profile: derandomized).

Sizes K, d, conditioning and seeds are drawn; each property is checked against an exact reference
(closed forms, the multi-start reference solver, or the same run on a transformed problem).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from scalebio import ScaleBiOConfig, evaluate, make_simplex, run, sgd
from scalebio.theory.optimality import minimize_on_simplex
from scalebio.toy_problems.mixture import (
    MixturePopulation,
    build_mixture,
    hyper_gradient,
    hyper_objective,
    lower_solution,
    make_misspecified_mixture,
    make_wellspecified_mixture,
    mixture_problem,
    penalized_solution,
)

SIMPLEX_TOL = 1e-12  # float64 round-off of a K-term sum and of the floor/cap affine maps
TRAJ_TOL = 1e-10  # two runs that are equal in exact arithmetic, 30 float64 steps apart
REF_TOL = 1e-6  # reference-solver accuracy (L1), see tests/theory/test_optimality.py
RATIO = 5.0  # error(10α) ≤ error(α)/5: the bias is e₁/α + O(1/α²), so the ratio → 10
STEPS = 30

sizes = st.integers(min_value=2, max_value=4)
extra_dims = st.integers(min_value=0, max_value=2)
conds = st.sampled_from([1.0, 4.0, 30.0])
seeds = st.integers(min_value=0, max_value=10_000)


def _config(toy, alpha: float, lr_x: float = 0.05, scale: float = 1.0,
            penalty: float | None = None) -> ScaleBiOConfig:
    """SGD, η_y = η_z = 1/(L_f + αL_g), all steps × ``scale``; run at ``penalty`` (default α)."""
    c = toy.constants
    lr_y = 1.0 / (c.val_smooth + alpha * c.lower_smooth)
    return ScaleBiOConfig(alpha=alpha if penalty is None else penalty, opt_x=sgd(scale * lr_x),
                          opt_y=sgd(scale * lr_y), opt_z=sgd(scale * lr_y))


def _trajectory(problem, toy, config, x0=None) -> torch.Tensor:
    x0 = toy.x0 if x0 is None else x0
    result = run(problem, x0, toy.y0, config, STEPS, progress=False)
    return torch.stack([m.weights for m in result.history])


def _reference(pop: MixturePopulation) -> np.ndarray:
    k = pop.coefs.shape[0]
    return minimize_on_simplex(lambda p: float(hyper_objective(pop, torch.from_numpy(p))),
                               lambda p: hyper_gradient(pop, torch.from_numpy(p)).numpy(),
                               k, num_random_starts=2).weights


def permute_sources(pop: MixturePopulation, perm) -> MixturePopulation:
    """New source i is old source perm[i]."""
    p = torch.as_tensor(perm)
    mix = None if pop.val_mixture is None else pop.val_mixture[p]
    return pop._replace(covs=pop.covs[p], coefs=pop.coefs[p], noise=pop.noise[p], val_mixture=mix)


def duplicate_source(pop: MixturePopulation, k: int) -> MixturePopulation:
    """Append a copy of source k; validation unchanged."""
    return pop._replace(covs=torch.cat([pop.covs, pop.covs[k : k + 1]]),
                        coefs=torch.cat([pop.coefs, pop.coefs[k : k + 1]]),
                        noise=torch.cat([pop.noise, pop.noise[k : k + 1]]), val_mixture=None)


@settings(max_examples=16)
@given(k=sizes, seed=seeds, geometry=st.sampled_from(["softmax", "mirror", "floor_cap", "fixed"]))
def test_weights_stay_on_the_simplex_and_respect_constraints(k, seed, geometry):
    toy = make_wellspecified_mixture(k + 1, k + 2, seed)
    kk = k + 1
    spec = {
        "softmax": make_simplex(kk),
        "mirror": make_simplex(kk, geometry="mirror"),
        "floor_cap": make_simplex(kk, floor=0.05, cap=0.6, geometry="mirror"),
        "fixed": make_simplex(kk, fixed={0: 0.3}, floor=0.02),
    }[geometry]
    gen = torch.Generator().manual_seed(seed)
    x0 = 4 * torch.randn(kk, generator=gen, dtype=torch.float64)  # start near a corner
    w = _trajectory(mixture_problem(toy.population, spec), toy, _config(toy, 10.0, lr_x=1.0), x0)
    assert float(w.min()) >= -SIMPLEX_TOL
    assert_close(w.sum(1), torch.ones(STEPS, dtype=torch.float64), rtol=0, atol=SIMPLEX_TOL)
    assert bool((w >= spec.floor - SIMPLEX_TOL).all() and (w <= spec.cap + SIMPLEX_TOL).all())
    pinned = ~torch.isnan(spec.fixed)
    assert_close(w[:, pinned], spec.fixed[pinned].expand(STEPS, -1), rtol=0, atol=SIMPLEX_TOL)


@settings(max_examples=12)
@given(k=sizes, extra=extra_dims, seed=seeds, cond=conds, data=st.data())
def test_permuting_sources_permutes_the_trajectory(k, extra, seed, cond, data):
    toy = make_misspecified_mixture(k, k + extra, seed, cond=cond)
    perm = data.draw(st.permutations(range(k)))
    moved = build_mixture(permute_sources(toy.population, perm), toy.optimum[list(perm)])
    config = _config(toy, 100.0)
    w = _trajectory(toy.problem, toy, config)
    w_perm = _trajectory(moved.problem, moved, config)
    assert_close(w_perm, w[:, list(perm)], rtol=0, atol=TRAJ_TOL)


@settings(max_examples=8)
@given(k=sizes, extra=extra_dims, seed=seeds, c=st.floats(min_value=0.1, max_value=10.0))
def test_scaling_the_validation_loss(k, extra, seed, c):
    """Bilevel optimum: unchanged (argmin of cΦ = argmin of Φ).

    ScaleBiO itself is *not* invariant: with f → c f its directions are exactly c times those of
    the unscaled problem at penalty α/c (d_x = α∇_x[g_y − g_z], d_y = c∇f + α∇g_y, d_z = α∇g_z),
    so SGD with steps η on (c f, α) is step for step SGD with steps cη on (f, α/c): scaling
    validation up by c acts like dividing α by c, and its fixed point moves by the O(c/α) bias.
    """
    toy = make_misspecified_mixture(k, k + extra, seed)
    scaled = toy.population._replace(val_cov=c * toy.population.val_cov,
                                      val_noise=c * toy.population.val_noise)
    assert np.abs(_reference(scaled) - _reference(toy.population)).sum() <= REF_TOL
    scaled_problem = toy.problem._replace(upper=lambda x, y, b: c * toy.problem.upper(x, y, b))
    alpha = 50.0
    w_scaled = _trajectory(scaled_problem, toy, _config(toy, alpha))
    w_equiv = _trajectory(toy.problem, toy, _config(toy, alpha, scale=c, penalty=alpha / c))
    assert_close(w_scaled, w_equiv, rtol=0, atol=TRAJ_TOL)
    if abs(np.log(c)) > np.log(2):  # … and it is a different run from the unscaled one
        w_plain = _trajectory(toy.problem, toy, _config(toy, alpha))
        assert float((w_plain - w_scaled).abs().max()) > 1e3 * TRAJ_TOL


@settings(max_examples=20)
@given(k=sizes, extra=extra_dims, seed=seeds, cond=conds,
       factor=st.floats(min_value=1.0, max_value=100.0))
def test_first_order_estimate_tends_to_the_exact_hypergradient(k, extra, seed, cond, factor):
    """‖d_x(α) − ∇Φ‖ with exact inner solutions, through the core's penalty surrogate.

    w_α − w* = −(αA + H_f)⁻¹∇f(w*), so the error is e₁/α + O(r/α) with r = L_f/(α μ_g). Taking
    α ≥ 100 L_f/μ_g keeps r ≤ 0.01, so error(10α)/error(α) is 1/10 up to a few percent: ≤ 1/5.
    """
    toy = make_misspecified_mixture(k, k + extra, seed, cond=cond)
    pop, c = toy.population, toy.constants
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, generator=gen, dtype=torch.float64)  # a non-optimal interior point
    pi = toy.problem.weights(x)
    exact = (torch.diag(pi) - torch.outer(pi, pi)) @ hyper_gradient(pop, pi)

    def error(alpha: float) -> float:
        xl = x.clone().requires_grad_(True)
        terms = evaluate(toy.problem, xl, penalized_solution(pop, pi, alpha),
                         lower_solution(pop, pi), None, alpha)
        (d_x,) = torch.autograd.grad(terms.surrogate, xl)
        return float((d_x - exact).norm())

    alpha = factor * 100 * c.val_smooth / c.mu_lower
    assert error(10 * alpha) <= error(alpha) / RATIO


@settings(max_examples=10)
@given(k=st.integers(min_value=3, max_value=4), seed=seeds, face=st.booleans(), data=st.data())
def test_duplicating_a_source_splits_its_optimal_weight(k, seed, face, data):
    toy = make_misspecified_mixture(k, k + 1, seed, face=face)
    j = data.draw(st.integers(min_value=0, max_value=k - 1))
    original = _reference(toy.population)
    split = _reference(duplicate_source(toy.population, j))
    merged = split[:k].copy()
    merged[j] += split[k]
    assert np.abs(merged - original).sum() <= REF_TOL
