"""Minibatches for the mixture toys, and the exact variance of the stochastic gradients.

Every draw takes an explicit ``torch.Generator``. Per example of source k (a ~ N(0, Σ_k),
t = β_kᵀa + ε, ε ~ N(0, σ_k²)) and a linear model w, with v = w − β_k and r = aᵀv − ε ~ N(0, s²),
s² = vᵀΣ_kv + σ_k²:

* loss ½r²:       mean s²/2,  variance s⁴/2                       (r² / s² is χ²₁, variance 2);
* gradient a·r:   mean Σ_k v, covariance C_k(w) = s² Σ_k + Σ_k v vᵀ Σ_k   (Isserlis' theorem:
  E[(aᵀv)² aaᵀ] = (vᵀΣv) Σ + 2 Σvvᵀ Σ, and E[ε² aaᵀ] = σ² Σ).

A minibatch with n_k examples of source k estimates the lower gradient Σ_k π_k ∇ℓ_k(w) with
covariance Σ_k π_k² C_k(w) / n_k; the validation gradient of a batch of m examples has covariance
C_v(w) / m, where for a well-specified (mixture) validation C_v = Σ_k π°_k [C_k + Σ_k v_k v_kᵀ Σ_k]
− μμᵀ with μ = Σ_k π°_k Σ_k v_k (law of total covariance over the component).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .mixture import DTYPE, MixturePopulation


class MixtureBatch(NamedTuple):
    """A minibatch: ``batch_size`` examples of every source, ``val_batch_size`` validation ones.

    Attributes:
      inputs: (K, n, d) a's per source.   targets: (K, n) t's per source.
      val_inputs: (m, d).   val_targets: (m,).
    """

    inputs: Tensor
    targets: Tensor
    val_inputs: Tensor
    val_targets: Tensor


def _gaussian_rows(cov: Tensor, coef: Tensor, noise: Tensor, n: int, gen: torch.Generator):
    a = torch.randn(n, cov.shape[0], generator=gen, dtype=DTYPE) @ torch.linalg.cholesky(cov).T
    t = a @ coef + noise.sqrt() * torch.randn(n, generator=gen, dtype=DTYPE)
    return a, t


def sample_batch(pop: MixturePopulation, batch_size: int, val_batch_size: int,
                 gen: torch.Generator) -> MixtureBatch:
    """Draw a stratified minibatch: ``batch_size`` from each source, ``val_batch_size`` validation.

    Validation examples come from the mixture Σ π°_k P_k (component drawn per example) when
    ``pop.val_mixture`` is set, else from N(0, Σ_v) with t = β_vᵀa + N(0, σ_v²).
    """
    if batch_size < 1 or val_batch_size < 1:
        raise ValueError(f"batch_size/val_batch_size: need ≥ 1, got {batch_size}/{val_batch_size}")
    rows = [_gaussian_rows(c, b, s, batch_size, gen)
            for c, b, s in zip(pop.covs, pop.coefs, pop.noise)]
    inputs, targets = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    if pop.val_mixture is None:
        va, vt = _gaussian_rows(pop.val_cov, pop.val_coef, pop.val_noise, val_batch_size, gen)
    else:
        comp = torch.multinomial(pop.val_mixture, val_batch_size, replacement=True, generator=gen)
        counts = torch.bincount(comp, minlength=pop.coefs.shape[0]).tolist()
        parts = [_gaussian_rows(pop.covs[k], pop.coefs[k], pop.noise[k], c, gen)
                 for k, c in enumerate(counts) if c > 0]
        va, vt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return MixtureBatch(inputs, targets, va, vt)


def batch_stream(pop: MixturePopulation, batch_size: int, val_batch_size: int,
                 seed: int) -> Callable[[int], MixtureBatch]:
    """t ↦ the t-th minibatch, from a generator seeded by (seed, t): random access, no state."""

    def batches(t: int) -> MixtureBatch:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
        return sample_batch(pop, batch_size, val_batch_size, gen)

    return batches


def example_gradient_cov(cov: Tensor, coef: Tensor, noise: Tensor, w: Tensor) -> Tensor:
    """C(w) = (vᵀΣv + σ²) Σ + Σ v vᵀ Σ, v = w − β: covariance of one example's gradient a·r."""
    v = w.to(DTYPE) - coef
    sv = cov @ v
    return (v @ sv + noise) * cov + torch.outer(sv, sv)


def example_loss_var(cov: Tensor, coef: Tensor, noise: Tensor, w: Tensor) -> Tensor:
    """Var(½r²) = s⁴/2 with s² = vᵀΣv + σ², v = w − β: variance of one example's loss."""
    v = w.to(DTYPE) - coef
    return 0.5 * (v @ cov @ v + noise) ** 2


def lower_gradient_cov(pop: MixturePopulation, pi: Tensor, w: Tensor, batch_size: int) -> Tensor:
    """Covariance of the minibatch lower gradient ∇_w Σ_k π_k ℓ̂_k(w): Σ_k π_k² C_k(w) / n."""
    covs = torch.stack([example_gradient_cov(c, b, s, w)
                        for c, b, s in zip(pop.covs, pop.coefs, pop.noise)])
    return torch.einsum("k,kij->ij", pi.to(DTYPE) ** 2, covs) / batch_size


def val_gradient_cov(pop: MixturePopulation, w: Tensor, val_batch_size: int) -> Tensor:
    """Covariance of the minibatch validation gradient (Gaussian or mixture validation), over m."""
    if pop.val_mixture is None:
        return example_gradient_cov(pop.val_cov, pop.val_coef, pop.val_noise, w) / val_batch_size
    means = torch.einsum("kij,kj->ki", pop.covs, w.to(DTYPE) - pop.coefs)  # Σ_k v_k per component
    second = torch.stack([example_gradient_cov(c, b, s, w) + torch.outer(m, m)
                          for c, b, s, m in zip(pop.covs, pop.coefs, pop.noise, means)])
    mu = pop.val_mixture @ means
    cov = torch.einsum("k,kij->ij", pop.val_mixture, second) - torch.outer(mu, mu)
    return cov / val_batch_size
