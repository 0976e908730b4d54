"""Data-mixture toys: K Gaussian linear-regression sources, closed-form bilevel solution.

Source k draws a ~ N(0, Σ_k) and t = β_kᵀa + ε, ε ~ N(0, σ_k²); the per-example loss of a linear
model w is ½(wᵀa − t)². Its population (expected) loss is

    ℓ_k(w) = ½ (w − β_k)ᵀ Σ_k (w − β_k) + σ_k²/2.

The lower level is L_tr(w; π) = Σ_k π_k ℓ_k(w) with π = π(θ) on the simplex, so

    A(π) = Σ_k π_k Σ_k,   w*(π) = A(π)⁻¹ Σ_k π_k Σ_k β_k,
    ∂w*/∂π_k = −A(π)⁻¹ ∇ℓ_k(w*) = A(π)⁻¹ Σ_k (β_k − w*),

and with the validation loss L_val(w) = ½ (w − β_v)ᵀ Σ_v (w − β_v) + σ_v²/2 the hyper-objective is
Φ(π) = L_val(w*(π)) with ∇_π Φ_k = −∇L_val(w*)ᵀ A⁻¹ ∇ℓ_k(w*). Because w*(cπ) = w*(π), Φ is
homogeneous of degree 0 and πᵀ∇_πΦ = 0 everywhere (so the simplex KKT multiplier is ν = 0).

The well-specified toy has validation = the mixture Σ π°_k P_k, i.e. L_val = Σ π°_k ℓ_k, whose
Hessian/linear term give Σ_v = A(π°) and β_v = w*(π°). See ``theory/README.md`` for the proof that
π° is a bilevel optimum and for when it is the unique one. Every number here is float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from scalebio.problem import BilevelProblem, reweighting_problem
from scalebio.simplex import SimplexSpec, make_simplex

DTYPE = torch.float64


class MixturePopulation(NamedTuple):
    """The K training sources and the validation distribution (all float64).

    Attributes:
      covs: (K, d, d) input covariances Σ_k.
      coefs: (K, d) true coefficients β_k.
      noise: (K,) label-noise variances σ_k².
      val_cov, val_coef, val_noise: Σ_v (d, d), β_v (d,), σ_v² (0-d) of the validation distribution.
      val_mixture: (K,) π° when validation is the mixture Σ π°_k P_k (well specified), else None.
    """

    covs: Tensor
    coefs: Tensor
    noise: Tensor
    val_cov: Tensor
    val_coef: Tensor
    val_noise: Tensor
    val_mixture: Tensor | None = None


class MixtureConstants(NamedTuple):
    """Problem constants used to choose step sizes and check claims.

    mu_lower ≤ λ_min(A(π)) and lower_smooth ≥ λ_max(A(π)) for every π on the simplex (λ_min is
    concave and λ_max convex in A); val_smooth = λ_max(Σ_v); identifiability = the smallest singular
    value of ∂w*/∂π on the tangent space of the optimum's face (> 0 ⟺ unique optimum; see README).
    """

    mu_lower: float
    lower_smooth: float
    val_smooth: float
    identifiability: float


class MixtureToy(NamedTuple):
    """Everything a test or claim needs: the problem, a start and the exact solution."""

    problem: BilevelProblem
    simplex: SimplexSpec
    population: MixturePopulation
    x0: Tensor  # (K,) logits, zeros → π = prior
    y0: Tensor  # (d,) model start
    optimum: Tensor  # (K,) π*, the exact bilevel optimum
    w_star: Tensor  # (d,) w*(π*)
    constants: MixtureConstants
    names: tuple[str, ...]


# ---------------------------------------------------------------- closed forms
def source_losses(pop: MixturePopulation, w: Tensor) -> Tensor:
    """ℓ_k(w) = ½ (w − β_k)ᵀ Σ_k (w − β_k) + σ_k²/2 for every k, shape (K,)."""
    r = w.to(DTYPE) - pop.coefs
    return 0.5 * torch.einsum("ki,kij,kj->k", r, pop.covs, r) + 0.5 * pop.noise


def val_loss(pop: MixturePopulation, w: Tensor) -> Tensor:
    """L_val(w) = ½ (w − β_v)ᵀ Σ_v (w − β_v) + σ_v²/2."""
    r = w.to(DTYPE) - pop.val_coef
    return 0.5 * r @ pop.val_cov @ r + 0.5 * pop.val_noise


def lower_solution(pop: MixturePopulation, pi: Tensor) -> Tensor:
    """w*(π) = A(π)⁻¹ Σ_k π_k Σ_k β_k, A(π) = Σ_k π_k Σ_k."""
    pi = pi.to(DTYPE)
    a = torch.einsum("k,kij->ij", pi, pop.covs)
    b = torch.einsum("k,kij,kj->i", pi, pop.covs, pop.coefs)
    return torch.linalg.solve(a, b)


def penalized_solution(pop: MixturePopulation, pi: Tensor, alpha: float) -> Tensor:
    """w*_α(π) = argmin_w L_val(w) + α Σ_k π_k ℓ_k(w) = (Σ_v + αA)⁻¹(Σ_v β_v + α Σ_k π_kΣ_kβ_k)."""
    pi = pi.to(DTYPE)
    a = pop.val_cov + alpha * torch.einsum("k,kij->ij", pi, pop.covs)
    b = pop.val_cov @ pop.val_coef + alpha * torch.einsum("k,kij,kj->i", pi, pop.covs, pop.coefs)
    return torch.linalg.solve(a, b)


def hyper_objective(pop: MixturePopulation, pi: Tensor) -> Tensor:
    """Φ(π) = L_val(w*(π))."""
    return val_loss(pop, lower_solution(pop, pi))


def weight_jacobian(pop: MixturePopulation, pi: Tensor) -> Tensor:
    """∂w*/∂π, shape (d, K): column k is A(π)⁻¹ Σ_k (β_k − w*(π))."""
    pi = pi.to(DTYPE)
    w = lower_solution(pop, pi)
    a = torch.einsum("k,kij->ij", pi, pop.covs)
    cols = torch.einsum("kij,kj->ik", pop.covs, pop.coefs - w)
    return torch.linalg.solve(a, cols)


def hyper_gradient(pop: MixturePopulation, pi: Tensor) -> Tensor:
    """∇_π Φ(π) = (∂w*/∂π)ᵀ ∇L_val(w*(π)), shape (K,) (the implicit-function-theorem formula)."""
    w = lower_solution(pop, pi)
    return weight_jacobian(pop, pi).T @ (pop.val_cov @ (w - pop.val_coef))


def penalty_value(pop: MixturePopulation, pi: Tensor, alpha: float) -> Tensor:
    """Ψ*_α(π) = min_w max_u Ψ_α = L_val(w*_α) + α Σπ_k [ℓ_k(w*_α) − ℓ_k(w*)] (exact inner solves).

    ScaleBiO's x-iteration is gradient descent on Ψ*_α, so its fixed points are those of Ψ*_α.
    """
    w_a = penalized_solution(pop, pi, alpha)
    gap = pi.to(DTYPE) @ (source_losses(pop, w_a) - source_losses(pop, lower_solution(pop, pi)))
    return val_loss(pop, w_a) + alpha * gap


def penalty_gradient(pop: MixturePopulation, pi: Tensor, alpha: float) -> Tensor:
    """The first-order estimate at exact inner solutions, in π-space: α [ℓ(w*_α(π)) − ℓ(w*(π))].

    This is ∇_π of the penalised value function Ψ*_α(π) = min_w max_u Ψ_α (envelope theorem);
    it equals ∇_π Φ + O(1/α).
    """
    h_y = source_losses(pop, penalized_solution(pop, pi, alpha))
    return alpha * (h_y - source_losses(pop, lower_solution(pop, pi)))


def tangent_basis(support: Tensor) -> Tensor:
    """Orthonormal basis (K, |S|−1) of {δ : Σδ = 0, δ_k = 0 for k ∉ S}, S = ``support`` (bool)."""
    k = support.numel()
    idx = torch.nonzero(support).flatten()
    sub = torch.zeros(k, idx.numel(), dtype=DTYPE)
    sub[idx, torch.arange(idx.numel())] = 1.0
    # the columns of I − 11ᵀ/|S| span the face's tangent space; QR gives an orthonormal basis
    n = idx.numel()
    centred = torch.eye(n, dtype=DTYPE) - 1.0 / n
    q, _ = torch.linalg.qr(centred[:, : n - 1])
    return sub @ q


def identifiability_margin(pop: MixturePopulation, pi: Tensor,
                           support: Tensor | None = None) -> float:
    """σ_min of ∂w*/∂π restricted to the tangent space of π's face (0 ⟺ π is not identifiable).

    w*(π') = w*(π) ⟺ Σ_k π'_k Σ_k (β_k − w*(π)) = 0, which is linear in π', so the set of weights
    reaching the same model is π + (null space of this map on the tangent space) ∩ simplex:
    a positive margin means π is the only such weight (within its face, and globally when π is
    interior). ``support`` defaults to {k : π_k > 0}.
    """
    support = pi > 0 if support is None else support
    if int(support.sum()) < 2:
        return float("inf")
    jac = weight_jacobian(pop, pi) @ tangent_basis(support)
    if jac.shape[0] < jac.shape[1]:  # d < |S| − 1: the map cannot be injective
        return 0.0
    return float(torch.linalg.svdvals(jac).min())


# ---------------------------------------------------------------- building problems
def mixture_problem(pop: MixturePopulation, simplex: SimplexSpec) -> BilevelProblem:
    """The reweighting BilevelProblem: population losses when batch is None, else empirical.

    A batch is a ``MixtureBatch`` from ``mixture_stochastic.sample_batch``; then ℓ_k and L_val are
    minibatch means of ½(wᵀa − t)² (unbiased for the population losses).
    """

    def losses(w, batch):
        if batch is None:
            return source_losses(pop, w)
        return 0.5 * ((torch.einsum("knd,d->kn", batch.inputs, w) - batch.targets) ** 2).mean(1)

    def val(w, batch):
        if batch is None:
            return val_loss(pop, w)
        return 0.5 * ((batch.val_inputs @ w - batch.val_targets) ** 2).mean()

    return reweighting_problem(val, losses, simplex)


def build_mixture(pop: MixturePopulation, optimum: Tensor, geometry: str = "softmax",
                  names: tuple[str, ...] | None = None) -> MixtureToy:
    """Bundle a population whose bilevel optimum ``optimum`` is known into a :class:`MixtureToy`."""
    k, d = pop.coefs.shape
    if pop.covs.shape != (k, d, d) or pop.noise.shape != (k,):
        raise ValueError(f"pop: covs {tuple(pop.covs.shape)} / noise {tuple(pop.noise.shape)} do "
                         f"not match coefs (K={k}, d={d})")
    names = names or tuple(f"source_{i}" for i in range(k))
    if len(names) != k:
        raise ValueError(f"names: expected {k} names, got {len(names)}")
    spec = make_simplex(k, geometry=geometry)
    eig = torch.linalg.eigvalsh(pop.covs)
    support = optimum > 0
    consts = MixtureConstants(
        mu_lower=float(eig[:, 0].min()),
        lower_smooth=float(eig[:, -1].max()),
        val_smooth=float(torch.linalg.eigvalsh(pop.val_cov)[-1]),
        identifiability=identifiability_margin(pop, optimum, support),
    )
    return MixtureToy(
        problem=mixture_problem(pop, spec), simplex=spec, population=pop,
        x0=torch.zeros(k, dtype=DTYPE), y0=torch.zeros(d, dtype=DTYPE), optimum=optimum,
        w_star=lower_solution(pop, optimum), constants=consts, names=names,
    )


def random_spd(dim: int, cond: float, gen: torch.Generator) -> Tensor:
    """Q diag(λ) Qᵀ with Q Haar-random and λ log-spaced in [1, cond] (condition number ``cond``)."""
    if not cond >= 1:
        raise ValueError(f"cond: the condition number must be ≥ 1, got {cond!r}")
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DTYPE))
    q = q * torch.sign(torch.diagonal(r))  # the sign fix makes Q Haar-distributed
    lam = torch.logspace(0, float(torch.log10(torch.tensor(cond))), dim, dtype=DTYPE)
    return (q * lam) @ q.T


def random_weights(k: int, gen: torch.Generator, min_weight: float = 0.5) -> Tensor:
    """π = (min_weight/K)·1 + (1 − min_weight)·Dirichlet(1): every entry ≥ min_weight/K."""
    e = -torch.log(torch.rand(k, generator=gen, dtype=DTYPE))  # Exp(1) → normalised = Dirichlet(1)
    return min_weight / k + (1 - min_weight) * e / e.sum()


def random_sources(k: int, d: int, gen: torch.Generator, cond: float = 10.0):
    """Σ_k (condition ``cond``), β_k ~ N(0, I), σ_k² ~ U[0.1, 1] for K sources in dimension d."""
    covs = torch.stack([random_spd(d, cond, gen) for _ in range(k)])
    coefs = torch.randn(k, d, generator=gen, dtype=DTYPE)
    noise = 0.1 + 0.9 * torch.rand(k, generator=gen, dtype=DTYPE)
    return covs, coefs, noise


def make_wellspecified_mixture(num_sources: int, dim: int, seed: int, pi_true=None,
                               cond: float = 10.0, geometry: str = "softmax") -> MixtureToy:
    """Validation = the mixture Σ π°_k P_k of the sources, so the bilevel optimum is π° itself.

    L_val = Σ π°_k ℓ_k: Σ_v = A(π°), β_v = w*(π°), σ_v² = Σ π°_k(σ_k² + β_kᵀΣ_kβ_k) − β_vᵀΣ_vβ_v.
    π° is unique iff ``constants.identifiability`` > 0, which holds for generic sources when
    dim ≥ num_sources − 1 and fails whenever num_sources − 1 > dim (README, "Optimality").

    Args:
      num_sources: K ≥ 2.  dim: d ≥ 1.  seed: seeds a torch.Generator for every draw.
      pi_true: π° (K positive numbers, normalised here); random with entries ≥ 0.5/K if None.
      cond: condition number of each Σ_k.  geometry: the simplex geometry of the upper variable.
    """
    if num_sources < 2 or dim < 1:
        raise ValueError(f"num_sources/dim: need K ≥ 2 and d ≥ 1, got K={num_sources}, d={dim}")
    gen = torch.Generator().manual_seed(seed)
    covs, coefs, noise = random_sources(num_sources, dim, gen, cond)
    if pi_true is None:
        pi = random_weights(num_sources, gen)
    else:
        pi = torch.as_tensor(pi_true, dtype=DTYPE).flatten()
        if pi.numel() != num_sources or not (pi > 0).all() or not torch.isfinite(pi).all():
            raise ValueError(f"pi_true: need {num_sources} finite weights > 0, got {pi.tolist()}")
        pi = pi / pi.sum()
    val_cov = torch.einsum("k,kij->ij", pi, covs)
    val_coef = torch.linalg.solve(val_cov, torch.einsum("k,kij,kj->i", pi, covs, coefs))
    second = (pi * (noise + torch.einsum("ki,kij,kj->k", coefs, covs, coefs))).sum()
    val_noise = second - val_coef @ val_cov @ val_coef
    pop = MixturePopulation(covs, coefs, noise, val_cov, val_coef, val_noise, val_mixture=pi)
    return build_mixture(pop, pi, geometry)


def _reduced_hessian(pop: MixturePopulation, pi: Tensor, basis: Tensor) -> Tensor:
    hess = torch.autograd.functional.hessian(lambda p: hyper_objective(pop, p), pi)
    return basis.T @ hess @ basis


def make_misspecified_mixture(num_sources: int, dim: int, seed: int, face: bool = False,
                              num_zero: int = 1, misspecification: float = 0.5,
                              cond: float = 10.0, geometry: str = "softmax") -> MixtureToy:
    """Validation with its own (β_v, Σ_v), outside the sources' family; optimum inside or on a face.

    Construction (reliable by design): draw the sources, a target π* (interior, or ``num_zero``
    random sources at 0 when ``face``) and Σ_v; let w = w*(π*), m_k = ∂w*/∂π_k. Pick a unit
    direction ĝ with ĝᵀm_k = 0 on the support S of π* and ĝᵀm_j > 0 off it (min-norm solution of
    ĝᵀm_j = 1; for an interior π*, a random direction orthogonal to every m_k) and set
    β_v = w − s Σ_v⁻¹ ĝ, so ∇L_val(w) = s ĝ. Then ∇_πΦ(π*) = 0 on S and > 0 off S (KKT with
    strict complementarity), and min_w L_val < Φ(π*): no mixture of the sources fits validation.
    At π* the reduced Hessian of Φ on the face is H₀ + s H₁ (J and w do not depend on β_v), positive
    definite for s < s_max; we take s = ``misspecification`` · min(1, s_max/2), so π* is a strict
    local minimum with λ_min ≥ λ_min(H₀)/2. Global optimality is checked by the multi-start
    reference solver in the tests.

    Args:
      num_sources: K ≥ 2 (≥ 3 with ``face``).  dim: d ≥ K.  seed: seeds every draw.
      face: put π* on a face of the simplex.  num_zero: how many sources get weight 0 then.
      misspecification: in (0, 1], the size s of ∇L_val(w*(π*)) relative to min(1, s_max/2).
      cond: condition number of each Σ_k and of Σ_v.  geometry: simplex geometry of the logits.
    """
    if num_sources < 2 or dim < num_sources:
        raise ValueError(f"dim: need num_sources ≥ 2 and dim ≥ num_sources, got K={num_sources}, "
                         f"d={dim}")
    if face and not 1 <= num_zero <= num_sources - 2:
        raise ValueError(f"num_zero: need 1 ≤ num_zero ≤ K − 2, got {num_zero}")
    if not 0 < misspecification <= 1:
        raise ValueError(f"misspecification: must be in (0, 1], got {misspecification!r}")
    gen = torch.Generator().manual_seed(seed)
    covs, coefs, noise = random_sources(num_sources, dim, gen, cond)
    pi = random_weights(num_sources, gen)
    if face:
        pi[torch.randperm(num_sources, generator=gen)[:num_zero]] = 0.0
        pi = pi / pi.sum()
    val_cov = random_spd(dim, cond, gen)
    half = torch.tensor(0.5, dtype=DTYPE)
    pop = MixturePopulation(covs, coefs, noise, val_cov, torch.zeros(dim, dtype=DTYPE), half)
    w, jac = lower_solution(pop, pi), weight_jacobian(pop, pi)
    support = pi > 0
    if face:
        g = torch.linalg.pinv(jac.T) @ (~support).to(DTYPE)
    else:
        u, sv, _ = torch.linalg.svd(jac, full_matrices=True)
        rank = int((sv > 1e-10 * sv[0]).sum())
        perp = u[:, rank:]  # orthogonal to every m_k; non-empty since rank ≤ K − 1 < d
        g = perp @ torch.randn(perp.shape[1], generator=gen, dtype=DTYPE)
    shift = torch.linalg.solve(val_cov, g / g.norm())
    basis = tangent_basis(support)
    h0 = _reduced_hessian(pop._replace(val_coef=w), pi, basis)
    h1 = _reduced_hessian(pop._replace(val_coef=w - shift), pi, basis) - h0
    chol = torch.linalg.cholesky(h0)  # H₀ = JᵀΣ_vJ on the face: > 0 when π* is identifiable
    half_solved = torch.linalg.solve_triangular(chol, -h1, upper=False)  # L⁻¹(−H₁)
    sym = torch.linalg.solve_triangular(chol, half_solved.T, upper=False)  # L⁻¹(−H₁)L⁻ᵀ
    top = float(torch.linalg.eigvalsh(sym).max())  # H₀ + sH₁ > 0 ⟺ s·top < 1
    s_max = 1.0 / top if top > 0 else float("inf")
    s = misspecification * min(1.0, s_max / 2)
    return build_mixture(pop._replace(val_coef=w - s * shift), pi, geometry)
