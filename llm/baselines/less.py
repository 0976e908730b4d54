"""LESS-style source weights (Xia et al., 2024): gradient similarity to the validation set.

After a warm-up on the uniform mixture, each example i gets the gradient g_i = ∇ ℓ_i of its
token-mean loss with respect to the LM head (output embedding) only, randomly projected to
d = ``proj_dim`` dimensions, ĝ_i = P^T g_i with P ∈ R^{D×d} of i.i.d. Rademacher entries ±1/√d
(seeded), so E[P P^T] = I and E[⟨P^T a, P^T b⟩] = ⟨a, b⟩. The validation gradient ĝ_val is the
projected gradient of the mean per-example validation loss. Scores:

    s_i = cos(ĝ_i, ĝ_val),   per source S_k = mean_{i in k} s_i,

turned into weights by ``rule`` (softmax(S/T) or positive part; see ``scores_to_weights``).
With ``top_p``, the top fraction p of all scored examples by s_i is kept and their ids (row
indices within each source's tokenised data) are written to ``selected.json`` with every s_i.
Unlike LESS, gradients are plain (not Adam-preconditioned) and from one checkpoint, and P is
stored densely (D × d floats: fine for small heads, too big for a 50k × 4k head).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..losses import per_example_loss


def rademacher_projection(dim: int, proj_dim: int, generator: torch.Generator) -> Tensor:
    """P ∈ R^{dim×proj_dim}, entries ±1/√proj_dim with probability 1/2 each (float32)."""
    if dim < 1 or proj_dim < 1:
        raise ValueError(f"dim, proj_dim: need ≥ 1, got {dim}, {proj_dim}")
    signs = torch.randint(0, 2, (dim, proj_dim), generator=generator, dtype=torch.int8)
    return (signs.float() * 2.0 - 1.0) / math.sqrt(proj_dim)


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


def head_gradients(model, batches, device: torch.device, projection: Tensor) -> Tensor:
    """Projected per-example gradients of ℓ_i w.r.t. the output embedding: [N, proj_dim]."""
    head = model.get_output_embeddings().weight
    out = []
    for mb in batches:
        mb = {k: v.to(device) for k, v in mb.items()}
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        losses = per_example_loss(logits, mb["labels"])
        for i in range(losses.numel()):  # one backward per example: exact, fine for small heads
            (g,) = torch.autograd.grad(losses[i], head, retain_graph=i + 1 < losses.numel())
            out.append(g.reshape(-1).cpu().to(projection.dtype) @ projection)
    return torch.stack(out)


def mean_gradient(model, batches, device: torch.device, projection: Tensor) -> Tensor:
    """Projected gradient of the mean per-example loss over all examples of ``batches``."""
    head = model.get_output_embeddings().weight
    total, n = torch.zeros_like(head), 0
    for mb in batches:
        mb = {k: v.to(device) for k, v in mb.items()}
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        losses = per_example_loss(logits, mb["labels"])
        (g,) = torch.autograd.grad(losses.sum(), head)
        total, n = total + g, n + losses.numel()
    return (total / n).reshape(-1).cpu().to(projection.dtype) @ projection
