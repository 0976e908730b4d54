"""DoReMi (Xie et al., 2023): domain weights by Group DRO on a proxy against a reference model.

1. A reference model is trained on the uniform mixture for ``steps`` steps.
2. A proxy (same init) is trained for ``steps`` steps. At step t, on the step's batch, the
   per-source clipped excess loss is λ_k = (1/c_k) Σ_{i: s_i = k} max(ℓ_i^proxy − ℓ_i^ref, 0)
   (per-example token-mean losses ℓ_i; the paper clips per token). The weights move by one
   exponentiated-gradient (entropic mirror ascent) step with smoothing toward uniform u = 1/K:

       α'_t = α_{t-1} ⊙ exp(η λ_t),   α_t = (1 − c) α'_t / Σ α'_t + c u,

   and the proxy takes one AdamW step on Σ_k α_{t,k} h_k (h_k: its mean loss on source k).
3. Output, as in ``scalebio reweight``: the last α_T ("weights") and the time average
   ᾱ = (1/T) Σ_t α_t ("averaged_weights", the paper's answer: ``scalebio mix --averaged``), plus
   "trajectory": {"weights": [α_1..α_T], "excess": [λ_1..λ_T]} (each [K], in "names" order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from scalebio.llm.loop.losses import per_example_loss, source_partial_sums


def doremi_update(weights: Tensor, excess: Tensor, eta: float, smoothing: float) -> Tensor:
    """One DoReMi step: α' = α ⊙ exp(η λ), then (1 − c) α'/Σα' + c/K.

    Args:
      weights: [K] current α_{t-1} on the simplex (positive entries).
      excess: [K] clipped excess losses λ_t ≥ 0 (0 for a source absent from the batch).
      eta: step size η > 0. smoothing: c ∈ [0, 1].

    Returns:
      [K] α_t (float64). Computed in log space (softmax) so large η λ cannot overflow.
    """
    if weights.shape != excess.shape or weights.dim() != 1:
        raise ValueError(f"excess: expected shape {tuple(weights.shape)} like weights, "
                         f"got {tuple(excess.shape)}")
    if bool((weights <= 0).any()):
        raise ValueError("weights: DoReMi needs strictly positive weights (use smoothing > 0)")
    logits = weights.double().log() + eta * excess.double()
    k = weights.numel()
    return (1.0 - smoothing) * torch.softmax(logits, dim=0) + smoothing / k


def clipped_excess(proxy_losses: Tensor, ref_losses: Tensor, source_ids: Tensor,
                   counts: Tensor) -> Tensor:
    """λ_k = Σ_{i: s_i = k} max(ℓ_i^proxy − ℓ_i^ref, 0) / c_k over one micro-batch (0 if c_k = 0).
    """
    gap = (proxy_losses - ref_losses).clamp_min(0.0)
    return source_partial_sums(gap, source_ids, counts)


@torch.no_grad()
def batch_excess(proxy, reference, batch, device: torch.device) -> Tensor:
    """λ over all micro-batches of a step (forward passes only)."""
    lam = torch.zeros(len(batch.counts), dtype=torch.float64)
    for mb in batch.train:
        mb = {k: v.to(device) for k, v in mb.items()}
        kw = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
        lp = per_example_loss(proxy(**kw).logits, mb["labels"])
        lr = per_example_loss(reference(**kw).logits, mb["labels"])
        lam += clipped_excess(lp, lr, mb["source_ids"], batch.counts.to(device)).double().cpu()
    return lam
