"""Per-example and partial-sum losses for the ScaleBiO LLM loop (docs/method.md, section 4).

The loop accumulates the penalty surrogate over M micro-batches per rank. Every loss here is a
*partial sum* of a global-batch quantity, normalised by a *global* count known before the step
(per-source example counts c_k, supervised validation tokens N_tok), so that summing over
micro-batches and ranks gives exactly the global-batch value and its gradient:

    h_k  = Σ_{i in micro-batch, s_i = k} ℓ_i / c_k          (training, per source)
    v    = Σ_{supervised tokens t in micro-batch} CE_t / N_tok  (validation)

ℓ_i is the per-example *token mean* of response-token cross-entropy (0 for an example with no
supervised token); the validation loss is a global *token* mean (docs/method.md, pitfall 4: kept on
purpose to match the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Causal shift: position t predicts token t+1. Returns (logits, labels, mask) of supervised
    positions' parts, with logits upcast from 16-bit floats so CE is not computed in bf16."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:2])} for logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logits[:, :-1][mask]  # only supervised positions: [n, V]
    if picked.dtype in (torch.float16, torch.bfloat16):
        picked = picked.float()
    return picked, target[mask], mask


def per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """ℓ_i = (1/n_i) Σ_t CE(logits[i, t], labels[i, t+1]) over the n_i supervised targets.

    Args:
      logits: [B, T, V] model outputs.
      labels: [B, T] token ids, ``-100`` where not supervised.

    Returns:
      [B] per-example token-mean cross-entropy; 0 for an example with no supervised target.
    """
    picked, target, mask = _shift(logits, labels)
    token_ce = F.cross_entropy(picked, target, reduction="none")
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_ce.dtype, device=token_ce.device)
    sums = sums.index_add(0, rows, token_ce)
    n = mask.sum(dim=1)
    return torch.where(n > 0, sums / n.clamp_min(1).to(sums.dtype), torch.zeros_like(sums))


def source_partial_sums(per_example: Tensor, source_ids: Tensor, counts: Tensor) -> Tensor:
    """h_k = Σ_{i: s_i = k} ℓ_i / c_k, with c_k the *global* count of source k in the step's batch.

    Args:
      per_example: [b] per-example losses of this micro-batch.
      source_ids: [b] source index of each example, in [0, K).
      counts: [K] global per-source counts for the whole step (all micro-batches, all ranks).

    Returns:
      [K] partial sums; 0 for a source with c_k = 0 (an absent source contributes nothing).
    """
    if per_example.dim() != 1 or source_ids.shape != per_example.shape:
        raise ValueError(
            f"source_ids: expected shape {tuple(per_example.shape)} matching per_example, "
            f"got {tuple(source_ids.shape)}"
        )
    if counts.dim() != 1:
        raise ValueError(f"counts: expected a 1-D tensor [K], got shape {tuple(counts.shape)}")
    k = counts.shape[0]
    ids = source_ids.to(device=per_example.device, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
        raise ValueError(f"source_ids: values must lie in [0, {k}), got {ids.unique().tolist()}")
    c = counts.to(device=per_example.device, dtype=per_example.dtype)
    present = torch.zeros(k, dtype=torch.bool, device=per_example.device)
    present[ids] = True
    if bool((present & (c <= 0)).any()):
        raise ValueError(
            "counts: a source present in this micro-batch has global count 0; counts must be the "
            "global per-source counts of the step"
        )
    sums = torch.zeros(k, dtype=per_example.dtype, device=per_example.device)
    sums = sums.index_add(0, ids, per_example)
    return torch.where(c > 0, sums / c.clamp_min(1), torch.zeros_like(sums))


def val_partial_sum(logits: Tensor, labels: Tensor, total_tokens: int) -> Tensor:
    """v = (Σ of token CE over this micro-batch's supervised targets) / N_tok.

    Args:
      logits: [B, T, V]; labels: [B, T] with ``-100`` where not supervised.
      total_tokens: N_tok, supervised validation targets in the step's *global* batch (> 0).

    Returns:
      A scalar; summing it over micro-batches and ranks gives the global token-mean CE.
    """
    if not isinstance(total_tokens, int) or isinstance(total_tokens, bool) or total_tokens <= 0:
        raise ValueError(f"total_tokens: a positive integer is required, got {total_tokens!r}")
    picked, target, _ = _shift(logits, labels)
    return F.cross_entropy(picked, target, reduction="sum") / total_tokens


def count_targets(labels: Tensor) -> Tensor:
    """[B] number of supervised targets per example after the causal shift (``labels[:, 1:]``)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
