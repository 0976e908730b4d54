"""LESS-style source weights (Xia et al., 2024): gradient similarity to the validation set.

After a warm-up on the uniform mixture, each example i gets the gradient G_i = ∇_W ℓ_i of its
token-mean loss with respect to the LM head W ∈ R^{V×H} (logits z_t = W h_t), in closed form

    G_i = (1/n_i) Σ_t (softmax(z_t) − e_{y_t}) h_tᵀ,

randomly projected to d = ``proj_dim`` dimensions by a Kronecker-structured Rademacher map
P = P_V ⊗ P_H (P_V ∈ R^{V×d_V}, P_H ∈ R^{H×d_H}, d_V·d_H = d, i.i.d. entries ±1/√d_V and ±1/√d_H,
seeded): ĝ_i = Pᵀ vec(G_i) = vec(P_Vᵀ G_i P_H) = vec((1/n_i) Σ_t (P_Vᵀ(p_t − e_{y_t})) (P_Hᵀ h_t)ᵀ).
E[P Pᵀ] = E[P_V P_Vᵀ] ⊗ E[P_H P_Hᵀ] = I, so E[⟨ĝ_a, ĝ_b⟩] = ⟨G_a, G_b⟩ as for a dense map, but
the V×H gradient is never formed and P costs (V·d_V + H·d_H) floats instead of V·H·d: one forward
pass per batch and two small matrix products, also for a 128k × 4k head. (The price is a larger
variance than a dense map of the same d.) With tied embeddings this is the gradient through the
output path only. The validation gradient ĝ_val is the mean of the validation ĝ_i. Scores:

    s_i = cos(ĝ_i, ĝ_val),   per source S_k = mean_{i in k} s_i,

turned into weights by ``rule`` (softmax(S/T) or positive part; see ``scores_to_weights``).
With ``top_p``, the top fraction p of all scored examples by s_i is kept and their ids (row
indices within each source's tokenised data) are written to ``selected.json`` with every s_i.
Unlike LESS, gradients are plain (not Adam-preconditioned), of the head only (not LoRA weights),
and from one checkpoint.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class KroneckerProjection(NamedTuple):
    """P = left ⊗ right: ``left`` [V, d_V] acts on the vocabulary axis, ``right`` [H, d_H] on the
    hidden axis of a V×H head gradient; the projected dimension is d_V·d_H."""

    left: Tensor
    right: Tensor

    def dense(self) -> Tensor:
        """The [V·H, d_V·d_H] matrix itself (small heads and tests only)."""
        return torch.kron(self.left, self.right)


def _rademacher(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8)
    return (signs.float() * 2.0 - 1.0) / math.sqrt(cols)


def kronecker_projection(vocab: int, hidden: int, proj_dim: int,
                         generator: torch.Generator) -> KroneckerProjection:
    """Rademacher factors with d_H = the largest divisor of ``proj_dim`` ≤ √proj_dim and
    d_V = proj_dim / d_H (the vocabulary axis, usually the longer one, gets the larger factor)."""
    if vocab < 1 or hidden < 1 or proj_dim < 1:
        raise ValueError(f"vocab, hidden, proj_dim: need ≥ 1, got {vocab}, {hidden}, {proj_dim}")
    d_h = max(k for k in range(1, math.isqrt(proj_dim) + 1) if proj_dim % k == 0)
    left = _rademacher(vocab, proj_dim // d_h, generator)
    return KroneckerProjection(left, _rademacher(hidden, d_h, generator))


def cosine_scores(grads: Tensor, target: Tensor, eps: float = 1e-12) -> Tensor:
    """s_i = ⟨g_i, t⟩ / (‖g_i‖ ‖t‖) for rows g_i of ``grads`` [N, d] and ``target`` [d]."""
    if grads.dim() != 2 or target.shape != grads.shape[1:]:
        raise ValueError(f"target: expected shape ({grads.shape[-1]},) for grads "
                         f"{tuple(grads.shape)}, got {tuple(target.shape)}")
    num = grads @ target
    den = grads.norm(dim=1) * target.norm()
    return num / den.clamp_min(eps)


def source_scores(scores: list[Tensor]) -> Tensor:
    """S_k = mean of the per-example scores of source k."""
    if not scores or any(s.numel() == 0 for s in scores):
        raise ValueError("scores: every source needs at least one scored example")
    return torch.stack([s.double().mean() for s in scores])


def top_p_ids(scores: list[Tensor], p: float) -> list[list[int]]:
    """Ids kept by a global top-p filter: the ⌈p N⌉ highest scores over all N examples, returned
    per source as sorted row indices (ties broken by the lower flat position)."""
    flat = torch.cat([s.double() for s in scores])
    keep = max(1, math.ceil(p * flat.numel()))
    order = torch.sort(-flat, stable=True).indices[:keep]
    bounds = torch.tensor([0] + [s.numel() for s in scores]).cumsum(0)
    out = []
    for k in range(len(scores)):
        mine = order[(order >= bounds[k]) & (order < bounds[k + 1])] - bounds[k]
        out.append(sorted(mine.tolist()))
    return out


@torch.no_grad()
def head_gradients(model, batches, device: torch.device, projection: KroneckerProjection) -> Tensor:
    """Projected per-example gradients ĝ_i of ℓ_i w.r.t. the output embedding: [N, d_V·d_H]
    (module docstring; the head's input h_t is read by a forward hook, no backward pass)."""
    head = model.get_output_embeddings()
    left, right = (p.to(device) for p in projection)
    dtype = left.dtype  # the arithmetic runs in the projection's dtype (float64 in tests)
    seen: list[Tensor] = []
    hook = head.register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0]))
    out = []
    try:
        for mb in batches:
            mb = {k: v.to(device) for k, v in mb.items()}
            seen.clear()
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            h = seen[-1][:, :-1].to(dtype)  # position t predicts token t + 1
            labels = mb["labels"][:, 1:]
            for i in range(labels.shape[0]):
                mask = labels[i] != -100
                y = labels[i][mask]
                probs = torch.softmax(logits[i, :-1][mask].to(dtype), dim=-1)  # [n_i, V]
                a = probs @ left - left[y]  # (p_t − e_{y_t})ᵀ P_V: [n_i, d_V]
                b = h[i][mask] @ right  # h_tᵀ P_H: [n_i, d_H]
                out.append((a.T @ b).reshape(-1).cpu() / max(1, int(mask.sum())))
    finally:
        hook.remove()
    return torch.stack(out)


def mean_gradient(model, batches, device: torch.device, projection: KroneckerProjection) -> Tensor:
    """ĝ of the mean per-example loss over all examples of ``batches``: the mean of the ĝ_i
    (projection is linear)."""
    return head_gradients(model, batches, device, projection).mean(dim=0)
