"""Shared pieces of the mixture baselines: the trainer, a weighted training loop, per-example
losses and the weights.json writer. Their options: ``BaselineArgs`` in llm/baselines/args.py.

Every baseline runs in one process on one device (``engine.kind: single``; a multi-rank engine
is refused): the baselines are references to compare ScaleBiO's weights against, sized like
ScaleBiO's own runs. Set-up (data, sampler, models, engines, LISA draws) is that of ``reweight``
and ``sft`` (llm/loop/setup.py), so the config's ``lisa`` section applies (only the drawn blocks
hold optimizer state: a proxy of a large model fits where full AdamW would not). Batches come from
the config's ``data`` settings and ``run.seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scalebio.llm import outputs
from scalebio.llm.baselines.args import SCORE_RULES
from scalebio.llm.config import Config, ConfigError
from scalebio.llm.data.batching import StepBatch, StepSampler, collate
from scalebio.llm.engines.engine import OptimizerSpec
from scalebio.llm.loop.losses import per_example_loss, source_partial_sums, val_partial_sum
from scalebio.llm.loop.setup import LisaDraws, build_engine


def scores_to_weights(scores: Tensor, rule: str, temperature: float = 1.0) -> Tensor:
    """Per-source scores s_k → weights on the simplex.

    ``softmax``:  π_k = exp(s_k / T) / Σ_j exp(s_j / T).
    ``positive``: π_k = max(s_k, 0) / Σ_j max(s_j, 0), and uniform 1/K when no score is positive
    (nothing is preferred, so nothing is up-weighted).
    """
    if rule not in SCORE_RULES:
        raise ValueError(f"rule: expected one of {SCORE_RULES}, got {rule!r}")
    s = scores.to(torch.float64)
    if rule == "softmax":
        return torch.softmax(s / temperature, dim=0)
    pos = s.clamp_min(0.0)
    total = pos.sum()
    return pos / total if total > 0 else torch.full_like(s, 1.0 / s.numel())


def _to(mb: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in mb.items()}


def source_losses(model, batch: StepBatch, device: torch.device) -> Tensor:
    """h_k = mean loss of source k's examples in the step's batch (0 if absent), with graph."""
    h = torch.zeros(len(batch.counts), device=device)
    for mb in batch.train:
        mb = _to(mb, device)
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        per = per_example_loss(logits, mb["labels"])
        h = h + source_partial_sums(per, mb["source_ids"], batch.counts.to(device))
    return h


class Trainer:
    """A model's optimizer: the one-process engine (AdamW, weight decay 0) with the config's LISA
    draws, those of ``reweight``'s model w (a function of the step)."""

    def __init__(self, cfg: Config, model, lr: float):
        if cfg.engine.kind != "single":
            raise ConfigError(f"engine.kind: baselines run in one process; got "
                              f"{cfg.engine.kind!r}, set engine.kind: single")
        self.engine = build_engine(cfg, model, OptimizerSpec("adamw", lr, weight_decay=0.0))
        self.lisa = LisaDraws(cfg, {"w": self.engine})  # call at the start of every step
        self.lr = lr

    def step(self) -> None:
        self.engine.step(self.lr, None)  # steps and zeroes the gradients


def train_weighted(trainer: Trainer, sampler: StepSampler, steps: int, device: torch.device,
                   mixture: Callable[[StepBatch, Tensor], Tensor], desc: str,
                   progress: bool = True) -> list[Tensor]:
    """Minimise Σ_k π_k h_k for ``steps`` steps; returns the π used at each step.

    ``mixture(batch, h)`` gives π from the step's batch and detached per-source losses h (called
    after the forward pass, before the backward one, so DoReMi can set π_t from the same batch).
    """
    used = []
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        trainer.lisa(step)
        batch = sampler.batch(step)
        h = source_losses(trainer.engine.module, batch, device)
        pi = mixture(batch, h.detach()).to(device=device, dtype=h.dtype)
        loss = (pi * h).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc} step {step}: non-finite loss; lower --lr")
        loss.backward()
        trainer.step()
        used.append(pi.detach().cpu().double())
    return used


def train_on_validation(trainer: Trainer, sampler: StepSampler, steps: int,
                        device: torch.device, progress: bool = True) -> None:
    """Minimise the validation token-mean loss (RHO-LOSS's reference model)."""
    for step in tqdm(range(steps), desc="reference (validation)", disable=not progress):
        trainer.lisa(step)
        batch = sampler.batch(step)
        loss = torch.zeros((), device=device)
        for mb in batch.val:
            mb = _to(mb, device)
            logits = trainer.engine.module(input_ids=mb["input_ids"],
                                           attention_mask=mb["attention_mask"]).logits
            loss = loss + val_partial_sum(logits, mb["labels"], batch.val_tokens)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"reference step {step}: non-finite loss; lower --lr")
        loss.backward()
        trainer.step()


def example_batches(dataset, n: int, batch: int, pad_token_id: int):
    """The first ``min(n, len)`` rows of a tokenised dataset as collated micro-batches."""
    m = min(n, len(dataset))
    for start in range(0, m, batch):
        idx = list(range(start, min(m, start + batch)))
        yield collate(dataset[idx], torch.zeros(len(idx), dtype=torch.long), pad_token_id)


@torch.no_grad()
def example_losses(model, dataset, n: int, batch: int, pad_token_id: int,
                   device: torch.device) -> Tensor:
    """Per-example token-mean losses ℓ_i of the first ``n`` rows of ``dataset`` (float64, CPU)."""
    out = []
    for mb in example_batches(dataset, n, batch, pad_token_id):
        mb = _to(mb, device)
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        out.append(per_example_loss(logits, mb["labels"]).double().cpu())
    return torch.cat(out)


def write_result(out: Path, names, weights: Tensor, averaged: Tensor, method: str,
                 extra: dict) -> dict:
    """Write ``out/weights.json`` in the format of ``scalebio reweight``; return the document."""
    doc_extra = {"names": list(names), "method": method, **extra}
    return outputs.write_weights_json(out / "weights.json", names, weights.tolist(),
                                      averaged.tolist(), doc_extra)
