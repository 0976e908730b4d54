"""Mixture toys: closed forms against autograd, finite differences and a second implementation;
the optimum's properties (well specified, misspecified, identifiability); minibatch variances."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from scalebio.solver import evaluate
from scalebio.theory.hypergrad import exact_hypergradient, penalty_hypergradient
from scalebio.toy_problems.mixture import (
    hyper_gradient,
    hyper_objective,
    identifiability_margin,
    lower_solution,
    make_misspecified_mixture,
    make_wellspecified_mixture,
    penalized_solution,
    penalty_gradient,
    penalty_value,
    source_losses,
    tangent_basis,
    val_loss,
    weight_jacobian,
)
from scalebio.toy_problems.mixture_stochastic import (
    batch_stream,
    example_gradient_cov,
    example_loss_var,
    lower_gradient_cov,
    sample_batch,
    val_gradient_cov,
)

FD_EPS = 1e-5  # not 1e-4: Φ''' ~ 1/π³ is ~1e3 at weights ~0.1, so eps²Φ'''/6 ≈ 2e-8 needs 1e-5
FD_TOL = 1e-7  # truncation ~2e-8 plus round-off ~1e-16·Φ/eps ≈ 1e-10
Z_MAX = 4.5  # |empirical − formula| ≤ 4.5 standard errors: a two-sided normal tail of 7e-6/entry
IDENTIFIABLE_MARGIN = 1e-3  # generic draws give σ_min ~ 0.1–2; 1e-3 separates them from rank loss
STRICT_GAP = 1e-3  # strict complementarity: ∇_kΦ − ν on the zero set, which is ≥ ~0.1 by design


def _toys():
    return [make_wellspecified_mixture(4, 6, 0), make_misspecified_mixture(4, 6, 1),
            make_misspecified_mixture(5, 5, 2, face=True, num_zero=2)]


def _interior_point(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(k, generator=gen, dtype=torch.float64))  # Exp(1) → Dirichlet(1)
    return 0.2 / k + 0.8 * e / e.sum()


@pytest.mark.parametrize("toy", _toys(), ids=["well", "miss", "face"])
def test_lower_solution_is_the_minimiser(toy):
    pi = _interior_point(toy.optimum.numel(), 3)
    w = lower_solution(toy.population, pi).requires_grad_(True)
    (grad,) = torch.autograd.grad(pi @ source_losses(toy.population, w), w)
    assert_close(grad, torch.zeros_like(grad))
    w_a = penalized_solution(toy.population, pi, 7.0).requires_grad_(True)
    obj = val_loss(toy.population, w_a) + 7.0 * pi @ source_losses(toy.population, w_a)
    (grad,) = torch.autograd.grad(obj, w_a)
    assert_close(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("toy", _toys(), ids=["well", "miss", "face"])
def test_hyper_gradient_matches_central_differences_and_is_homogeneous(toy):
    pop, pi = toy.population, _interior_point(toy.optimum.numel(), 4)
    grad = hyper_gradient(pop, pi)
    eye = torch.eye(pi.numel(), dtype=torch.float64)
    fd = torch.stack([hyper_objective(pop, pi + FD_EPS * e) - hyper_objective(pop, pi - FD_EPS * e)
                      for e in eye]) / (2 * FD_EPS)
    assert_close(grad, fd, rtol=FD_TOL, atol=FD_TOL)
    jac = torch.autograd.functional.jacobian(lambda p: lower_solution(pop, p), pi)
    assert_close(weight_jacobian(pop, pi), jac)
    # Φ(cπ) = Φ(π) ⇒ πᵀ∇Φ = 0 (Euler's identity for degree-0 homogeneity)
    assert_close(pi @ grad, torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("toy", _toys(), ids=["well", "miss", "face"])
def test_hypergradients_agree_with_the_generic_implementations(toy):
    """Second implementation: theory.hypergrad works on the BilevelProblem with autograd."""
    pop, pi = toy.population, _interior_point(toy.optimum.numel(), 5)
    x = pi.log()  # softmax(log π) = π
    jac_t = torch.diag(pi) - torch.outer(pi, pi)  # d_θ = J(π)ᵀ ∇_π
    y_star = lower_solution(pop, pi)
    assert_close(exact_hypergradient(toy.problem, x, y_star), jac_t @ hyper_gradient(pop, pi))
    alpha, y_alpha = 50.0, penalized_solution(pop, pi, 50.0)
    assert_close(penalty_hypergradient(toy.problem, x, alpha, y_star, y_alpha=y_alpha,
                                       y_star=y_star), jac_t @ penalty_gradient(pop, pi, alpha))
    # and the core's own direction d_x at exact inner solutions (z = u tracks y*)
    xl = x.clone().requires_grad_(True)
    terms = evaluate(toy.problem, xl, y_alpha, y_star, None, alpha)
    (d_x,) = torch.autograd.grad(terms.surrogate, xl)
    assert_close(d_x, jac_t @ penalty_gradient(pop, pi, alpha))


def test_penalty_gradient_is_the_gradient_of_the_penalty_value():
    toy = make_misspecified_mixture(4, 6, 1)
    pi = _interior_point(4, 6)
    for alpha in (3.0, 300.0):
        auto = torch.autograd.functional.jacobian(
            lambda p, a=alpha: penalty_value(toy.population, p, a), pi)
        assert_close(penalty_gradient(toy.population, pi, alpha), auto)


def test_wellspecified_validation_is_the_mixture_and_pi0_is_stationary():
    toy = make_wellspecified_mixture(4, 6, 0, pi_true=[1.0, 2.0, 3.0, 4.0])
    pop, pi0 = toy.population, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert_close(toy.optimum, pi0)
    w = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close(val_loss(pop, w), pi0 @ source_losses(pop, w))
    assert_close(hyper_gradient(pop, pi0), torch.zeros(4, dtype=torch.float64))
    assert toy.constants.identifiability > IDENTIFIABLE_MARGIN


@pytest.mark.parametrize("k,d", [(5, 2), (4, 2)])
def test_not_identifiable_when_k_minus_1_exceeds_d(k, d):
    """K − 1 > d: ∂w*/∂π has a null direction δ on the tangent space and Φ is flat along it."""
    toy = make_wellspecified_mixture(k, d, 3)
    pi = toy.optimum
    assert toy.constants.identifiability == 0.0
    basis = tangent_basis(pi > 0)
    direction = basis @ torch.linalg.svd(weight_jacobian(toy.population, pi) @ basis).Vh[-1]
    other = pi + 0.5 * float((pi / direction.abs()).min()) * direction
    assert float((other - pi).abs().sum()) > 0.01
    assert_close(lower_solution(toy.population, other), toy.w_star)
    assert_close(hyper_objective(toy.population, other), hyper_objective(toy.population, pi))


@pytest.mark.parametrize("face", [False, True])
def test_misspecified_optimum_is_strict_kkt_and_outside_the_family(face):
    toy = make_misspecified_mixture(5, 6, 4, face=face, num_zero=2)
    pop, pi = toy.population, toy.optimum
    grad = hyper_gradient(pop, pi)
    support = pi > 0
    assert int((~support).sum()) == (2 if face else 0)
    assert_close(grad[support], torch.zeros(int(support.sum()), dtype=torch.float64))
    if face:
        assert float(grad[~support].min()) > STRICT_GAP
    # outside the family: the best reweighted model is worse on validation than β_v itself
    assert float(hyper_objective(pop, pi) - val_loss(pop, pop.val_coef)) > STRICT_GAP
    assert identifiability_margin(pop, pi) > IDENTIFIABLE_MARGIN


def test_factories_are_deterministic_and_validate_arguments():
    a, b = make_misspecified_mixture(3, 4, 7), make_misspecified_mixture(3, 4, 7)
    for ta, tb in zip(a.population, b.population):
        assert (ta is None and tb is None) or torch.equal(ta, tb)
    assert not torch.equal(a.population.covs, make_misspecified_mixture(3, 4, 8).population.covs)
    with pytest.raises(ValueError, match="pi_true"):
        make_wellspecified_mixture(3, 4, 0, pi_true=[0.5, 0.5])
    with pytest.raises(ValueError, match="pi_true"):
        make_wellspecified_mixture(3, 4, 0, pi_true=[0.5, 0.5, -0.1])
    with pytest.raises(ValueError, match="dim"):
        make_misspecified_mixture(4, 3, 0)
    with pytest.raises(ValueError, match="num_zero"):
        make_misspecified_mixture(3, 4, 0, face=True, num_zero=2)
    with pytest.raises(ValueError, match="misspecification"):
        make_misspecified_mixture(3, 4, 0, misspecification=1.5)
    with pytest.raises(ValueError, match="cond"):
        make_wellspecified_mixture(3, 4, 0, cond=0.5)


# ---------------------------------------------------------------- stochastic versions
def _z_scores(samples: torch.Tensor, formula: torch.Tensor) -> torch.Tensor:
    """(empirical covariance − formula) / its standard error, entrywise, for (N, d) samples."""
    centred = samples - samples.mean(0)
    prods = centred[:, :, None] * centred[:, None, :]
    se = prods.std(0) / samples.shape[0] ** 0.5
    return (prods.mean(0) - formula) / se


@pytest.mark.parametrize("toy", _toys()[:2], ids=["well(mixture val)", "miss(gaussian val)"])
def test_example_gradient_covariance_and_loss_variance(toy):
    pop = toy.population
    w = torch.randn(pop.coefs.shape[1], generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    n = 40_000
    batch = sample_batch(pop, n, n, torch.Generator().manual_seed(0))
    res = batch.inputs[0] @ w - batch.targets[0]
    grads = batch.inputs[0] * res[:, None]
    cov0 = example_gradient_cov(pop.covs[0], pop.coefs[0], pop.noise[0], w)
    assert float(_z_scores(grads, cov0).abs().max()) <= Z_MAX
    loss = 0.5 * res**2
    se_mean = float(loss.std()) / n**0.5
    assert abs(float(loss.mean() - source_losses(pop, w)[0])) <= Z_MAX * se_mean
    var_formula = float(example_loss_var(pop.covs[0], pop.coefs[0], pop.noise[0], w))
    se_var = float(((loss - loss.mean()) ** 2).std()) / n**0.5
    assert abs(float(loss.var()) - var_formula) <= Z_MAX * se_var
    val_res = batch.val_inputs @ w - batch.val_targets
    val_grads = batch.val_inputs * val_res[:, None]
    assert float(_z_scores(val_grads, val_gradient_cov(pop, w, 1)).abs().max()) <= Z_MAX


def test_minibatch_lower_gradient_through_the_problem_has_the_predicted_covariance():
    """Gradients of the actual BilevelProblem on minibatches: mean = population, cov = formula."""
    toy = make_wellspecified_mixture(3, 4, 1)
    pop, n = toy.population, 8
    x = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    pi = toy.problem.weights(x)
    w = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    stream = batch_stream(pop, n, 1, seed=5)
    grads = []
    for t in range(1000):
        wl = w.clone().requires_grad_(True)
        batch = stream(t)
        lower = toy.problem.combine(x, toy.problem.features(wl, batch), batch)
        grads.append(torch.autograd.grad(lower, wl)[0])
    grads = torch.stack(grads)
    wl = w.clone().requires_grad_(True)
    (pop_grad,) = torch.autograd.grad(pi @ source_losses(pop, wl), wl)
    se = grads.std(0) / len(grads) ** 0.5
    assert float(((grads.mean(0) - pop_grad) / se).abs().max()) <= Z_MAX
    formula = lower_gradient_cov(pop, pi, w, n)
    assert float(_z_scores(grads, formula).abs().max()) <= Z_MAX


def test_batch_stream_is_random_access_and_reproducible():
    pop = make_wellspecified_mixture(3, 4, 0).population
    s1, s2 = batch_stream(pop, 5, 7, seed=1), batch_stream(pop, 5, 7, seed=1)
    b = s1(3)
    assert b.inputs.shape == (3, 5, 4) and b.targets.shape == (3, 5)
    assert b.val_inputs.shape == (7, 4) and b.val_targets.shape == (7,)
    assert all(torch.equal(u, v) for u, v in zip(b, s2(3)))
    assert not torch.equal(s1(3).inputs, s1(4).inputs)
    with pytest.raises(ValueError, match="batch_size"):
        sample_batch(pop, 0, 4, torch.Generator().manual_seed(0))
