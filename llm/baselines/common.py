"""Shared pieces of the mixture baselines: hyperparameters, data/model set-up, a weighted training
loop, per-example losses and the weights.json writer.

Every baseline runs in one process on one device (``engine.kind: single``; a multi-rank engine
is refused): the baselines are references to compare ScaleBiO's weights against, sized like
ScaleBiO's own runs. Models train through the same engine as ``reweight`` and ``sft``, so the
config's ``lisa`` section applies (only the drawn blocks hold optimizer state: a proxy of a
large model fits where full AdamW would not). Batches come from :class:`StepSampler` with the
config's ``data`` settings and ``run.seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scalebio.llm import outputs
from scalebio.llm.config import Config, ConfigError
from scalebio.llm.data.batching import StepBatch, StepSampler, collate
from scalebio.llm.data.sources import SourceData, load_sources
from scalebio.llm.data.tokenizer import load_tokenizer
from scalebio.llm.loop.losses import per_example_loss, source_partial_sums, val_partial_sum
from scalebio.llm.model import load_model

RULES = ("softmax", "positive")


@dataclass(frozen=True)
class BaselineArgs:
    """Method hyperparameters (CLI flags of ``scalebio baseline``); None = take it from the config.

    steps: training steps of every model a method trains (default ``bilevel.steps``).
    lr: AdamW learning rate of those models (default ``bilevel.lr_u``).
    eta: DoReMi's exponentiated-gradient step size. smoothing: DoReMi's mixing c with uniform.
    rule/temperature: how RHO and LESS scores become weights (see :func:`scores_to_weights`).
    proj_dim: LESS projection dimension. top_p: LESS keeps the top fraction of examples (optional).
    max_examples: examples scored per source (and of validation) by RHO and LESS (first ones).
    eval_batch: examples per forward pass when scoring.
    """

    steps: int | None = None
    lr: float | None = None
    eta: float = 1.0
    smoothing: float = 1e-3
    rule: str = "softmax"
    temperature: float = 1.0
    proj_dim: int = 64
    top_p: float | None = None
    max_examples: int = 256
    eval_batch: int = 16

    def __post_init__(self):
        def check(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"baseline --{key}: {msg}")

        check(self.steps is None or self.steps >= 1, "steps", f"need ≥ 1, got {self.steps!r}")
        check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr!r}")
        check(self.eta > 0, "eta", f"must be > 0, got {self.eta!r}")
        check(0 <= self.smoothing <= 1, "smoothing", f"must lie in [0, 1], got {self.smoothing!r}")
        check(self.rule in RULES, "rule", f"expected one of {RULES}, got {self.rule!r}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature!r}")
        check(self.proj_dim >= 1, "proj-dim", f"need ≥ 1, got {self.proj_dim!r}")
        check(self.top_p is None or 0 < self.top_p <= 1, "top-p", f"must lie in (0, 1], "
              f"got {self.top_p!r}")
        check(self.max_examples >= 1, "max-examples", f"need ≥ 1, got {self.max_examples!r}")
        check(self.eval_batch >= 1, "eval-batch", f"need ≥ 1, got {self.eval_batch!r}")


def scores_to_weights(scores: Tensor, rule: str, temperature: float = 1.0) -> Tensor:
    """Per-source scores s_k → weights on the simplex.

    ``softmax``:  π_k = exp(s_k / T) / Σ_j exp(s_j / T).
    ``positive``: π_k = max(s_k, 0) / Σ_j max(s_j, 0), and uniform 1/K when no score is positive
    (nothing is preferred, so nothing is up-weighted).
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    s = scores.to(torch.float64)
    if rule == "softmax":
        return torch.softmax(s / temperature, dim=0)
    pos = s.clamp_min(0.0)
    total = pos.sum()
    return pos / total if total > 0 else torch.full_like(s, 1.0 / s.numel())


def load_data(cfg: Config, out: Path) -> tuple[object, SourceData]:
    """The config's tokenizer and tokenised sources (cache in ``data.cache_dir`` or out/cache)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    data = load_sources(cfg.data.source_specs(), cfg.data.validation_specs(), tokenizer,
                        cfg.data.max_length, cfg.data.cache_dir or str(out / "cache"))
    return tokenizer, data


def make_sampler(cfg: Config, data: SourceData, pad_token_id: int) -> StepSampler:
    stratified = cfg.data.batch_mode == "stratified"
    return StepSampler(data, cfg.data.batch_mode, val_batch=cfg.data.val_batch,
                       micro_batches=cfg.data.micro_batches, seed=cfg.run.seed,
                       pad_token_id=pad_token_id,
                       per_source=cfg.data.per_source if stratified else None,
                       global_batch=None if stratified else cfg.data.global_batch)


def new_model(cfg: Config, device: torch.device):
    """A fresh model with the config's init (same ``run.seed`` → same initial weights)."""
    model = load_model(path=cfg.model.path, config=cfg.model.config, dtype=cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code, seed=cfg.run.seed)
    return model.to(device)


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
    """A model's optimizer: the one-process engine of llm/engines/torch_ddp.py (AdamW, weight
    decay 0) with the config's LISA draws: those of ``reweight``'s model w, a function of the
    step."""

    def __init__(self, cfg: Config, model, lr: float):
        from scalebio.llm.engines.engine import OptimizerSpec
        from scalebio.llm.loop.reweight import build_engine, lisa_from_config

        if cfg.engine.kind != "single":
            raise ConfigError(f"engine.kind: baselines run in one process; got "
                              f"{cfg.engine.kind!r}, set engine.kind: single")
        self.lisa, self.num_blocks = lisa_from_config(cfg, model)
        self.engine = build_engine(cfg, model, OptimizerSpec("adamw", lr, weight_decay=0.0),
                                   self.lisa)
        self.lr, self.seed = lr, cfg.run.seed

    def before(self, step: int) -> None:
        """Re-draw the active blocks at the start of every LISA period."""
        if self.lisa is not None and step % self.lisa.period == 0:
            from scalebio.llm.engines.lisa import active_blocks_for

            self.engine.set_active_blocks(
                active_blocks_for(step, self.seed, self.num_blocks, self.lisa, "w"))

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
        trainer.before(step)
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
        trainer.before(step)
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
