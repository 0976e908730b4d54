"""One ScaleBiO step of the LLM loop (steps 2–4 of ``scalebio.llm.loop.reweight``'s docstring).

Kept apart from the loop so that benchmarks and parity tests run exactly this code, and so that
it imports neither ``datasets`` nor the engines.

**One autograd graph at a time.** The penalty surrogate S (``scalebio.penalty``) is linear in its
three model-dependent parts, f(w) on validation, H(w) and H(u) on training, because the lower
objective of data reweighting, G(λ, h) = Σ_k π_k(λ) h_k, is linear in h. So
S(f, H(w), H(u)) = S(f, 0, 0) + S(0, H(w), 0) + S(0, 0, H(u)) as functions of (λ, w, u), and the
gradient of S is the sum of the gradients of the three pieces, each of which touches one forward
graph only. The step therefore runs a backward right after each forward: the activation peak is
that of one forward + backward (as in SFT), not three. Each piece is built by
:func:`~scalebio.penalty.penalty_surrogate` itself (zero placeholders for the other two), so every
sign and α still comes from there; λ's gradient α J(π)(ℓ̄(w) − ℓ̄(u)) arrives in two halves, from
the H(w) and the H(u) pieces, and needs no model graph.

**Two timescales.** With ``bilevel.inner_steps_u`` = K > 1, u first takes K − 1 extra steps
(:func:`u_step`, λ and w fixed) on fresh batches, then the step runs as at K = 1 and gives u its
K-th step: λ's gradient α J(π)(ℓ̄(w) − ℓ̄(u)) sees u after K − 1 steps (simultaneous) or after all
K (alternating), exactly as ``scalebio.solver.step`` with ``inner_steps_z`` = K. During the
λ warm-up (``bilevel.lambda_warmup_steps``) u and w train and λ does not move.

**Absent sources** (``batch_mode: uniform``). A source k with c_k = 0 has ℓ̄_k(w) = ℓ̄_k(u) = 0
in the batch, yet through the softmax Jacobian it would receive −α π_k Σ_j π_j Δ_j
(Δ = ℓ̄(w) − ℓ̄(u)), which Adam normalises into a full-size step on no evidence about k. So its
λ gradient is zeroed and its logit is held for that step (Adam's moments for it only decay).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from scalebio import penalty_surrogate, weighted_sum
from scalebio import weights as simplex_weights
from scalebio.llm.loop.losses import per_example_loss, source_partial_sums, val_partial_sum


def _forward_losses(model, mb: dict, device) -> torch.Tensor:
    out = model(
        input_ids=mb["input_ids"].to(device), attention_mask=mb["attention_mask"].to(device)
    )
    return out.logits, mb["labels"].to(device)


def _piece(theta, combine, alpha, world, f=None, h_w=None, h_u=None, like=None):
    """Backward of the one piece of S given (the others are zero); return its PenaltyTerms.

    ``like`` shapes the zero placeholders of the features. The piece is multiplied by the world
    size because the engines average gradients over ranks while every loss here is a partial sum
    normalised by global counts.
    """
    zero_h = torch.zeros_like(like)
    zero_f = torch.zeros((), dtype=like.dtype, device=like.device)
    terms = penalty_surrogate(
        theta,
        zero_f if f is None else f,
        zero_h if h_w is None else h_w,
        zero_h if h_u is None else h_u,
        combine,
        alpha,
    )
    (terms.surrogate * world).backward()
    return terms


def bilevel_step(
    eng_u,
    eng_w,
    theta,
    opt_theta,
    batch,
    combine,
    alpha: float,
    lrs,
    clip,
    order: str = "simultaneous",
    world: int = 1,
    device=None,
    inner_batches=(),
    update_lambda: bool = True,
) -> dict:
    """One ScaleBiO step on a sampler batch (steps 2–4 of the module docstring).

    ``inner_batches``: the fresh batches of u's K − 1 extra steps (two timescales, module
    docstring); ``update_lambda`` False during the λ warm-up (u and w step, λ does not; its
    gradient is still formed and its norm reported).

    ``combine`` must be linear in the features (as :class:`Combine` is): the backward runs piece by
    piece (module docstring). Returns {"sums": [f, g_w, g_u, ℓ̄(w) (K), ℓ̄(u) (K)] of the global
    batch (float64, CPU), "weights": π(θ_t) (before the step), grad norms of u, w and λ}.
    """
    lr_u, lr_w, lr_lambda = lrs
    device = theta.device if device is None else device
    k = theta.numel()
    counts = batch.counts.to(device)
    sums = torch.zeros(3 + 2 * k, dtype=torch.float64, device=device)
    pi = combine.weights(theta.detach().double()).cpu()  # float64: sums to 1 to ~1e-16
    gn_u = float("nan")
    for extra in inner_batches:  # two timescales: u's K − 1 extra steps, before anything else
        gn_u = u_step(eng_u, theta, extra, combine, alpha, lr_u, clip, world, device)
    if order == "alternating":  # u first, at (λ_t, u_t); then λ and w see u_{t+1}
        gn_u = u_step(eng_u, theta, batch, combine, alpha, lr_u, clip, world, device)
    for tr, va in zip(batch.train, batch.val):
        # Forwards in the order of the single-graph step (w, u, w): dropout draws are unchanged.
        src = tr["source_ids"].to(device)
        h_w = source_partial_sums(
            per_example_loss(*_forward_losses(eng_w.module, tr, device)), src, counts
        )
        t_w = _piece(theta, combine, alpha, world, h_w=h_w, like=h_w)
        with torch.set_grad_enabled(order == "simultaneous"):
            h_u = source_partial_sums(
                per_example_loss(*_forward_losses(eng_u.module, tr, device)), src, counts
            )
        # alternating: h_u has no graph, the backward reaches λ alone (its −α J(π) ℓ̄(u) half)
        t_u = _piece(theta, combine, alpha, world, h_u=h_u, like=h_u)
        f = val_partial_sum(*_forward_losses(eng_w.module, va, device), batch.val_tokens)
        t_f = _piece(theta, combine, alpha, world, f=f, like=h_w)
        sums += torch.cat(
            [
                torch.stack([t_f.upper, t_w.lower_y, t_u.lower_z]).double(),
                h_w.detach().double(),
                h_u.detach().double(),
            ]
        )
    if dist.is_initialized():
        dist.all_reduce(sums)  # partial sums of global quantities: their sum is the value
        if theta.grad is not None:
            dist.all_reduce(theta.grad)
            theta.grad /= world
    if order == "simultaneous":
        gn_u = eng_u.step(lr_u, clip)
    gn_w = eng_w.step(lr_w, clip)
    absent = counts.to(theta.device) == 0
    if theta.grad is not None and bool(absent.any()):
        theta.grad[absent] = 0  # module docstring, "Absent sources"
    gn_theta = float(theta.grad.norm()) if theta.grad is not None else 0.0
    g_theta = (theta.grad.detach().double().cpu() if theta.grad is not None
               else torch.zeros(k, dtype=torch.float64))  # per source, for the diagnostics
    if update_lambda:
        for group in opt_theta.param_groups:
            group["lr"] = lr_lambda
        held = theta.detach()[absent].clone()
        opt_theta.step()
        with torch.no_grad():
            theta[absent] = held  # Adam's momentum would still move them
    opt_theta.zero_grad(set_to_none=True)
    return {
        "sums": sums.cpu(),
        "weights": pi,
        "grad_norm_u": gn_u,
        "grad_norm_w": gn_w,
        "grad_norm_lambda": gn_theta,
        "grad_lambda": g_theta,
    }


def u_step(eng_u, theta, batch, combine, alpha: float, lr_u: float, clip, world: int = 1,
           device=None) -> float:
    """One step of u alone on ``batch``: d_u = α ∇_u g(λ, u) at λ fixed; returns u's grad norm."""
    device = theta.device if device is None else device
    counts = batch.counts.to(device)
    for tr in batch.train:
        h_u = source_partial_sums(
            per_example_loss(*_forward_losses(eng_u.module, tr, device)),
            tr["source_ids"].to(device),
            counts,
        )
        # λ detached: this pass moves u only (λ's share of H(u) comes in the main loop)
        _piece(theta.detach(), combine, alpha, world, h_u=h_u, like=h_u)
    return eng_u.step(lr_u, clip)


class Combine:
    """G(θ, h) = Σ_k π_k(θ) h_k for the penalty surrogate, remembering π's parametrization."""

    def __init__(self, spec):
        self.spec = spec

    def weights(self, theta):
        return simplex_weights(theta, self.spec)

    def __call__(self, theta, h):
        return weighted_sum(simplex_weights(theta, self.spec), h)
