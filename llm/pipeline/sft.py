"""``scalebio sft``: fine-tune a model on a mixture (e.g. ``scalebio mix``'s mixture.jsonl).

A short explicit loop, no TRL. It reads the *same* config file as ``scalebio reweight`` and uses:

* ``model``, ``engine``, ``lisa``, ``run``: as in reweight (same loader, engines, LISA draws of the
  ``"w"`` stream, seed, checkpoint cadence);
* ``data.validation``, ``data.max_length``, ``data.cache_dir``, ``data.global_batch`` (examples
  per step, drawn uniformly with replacement from the mixture), ``data.micro_batches``;
* ``bilevel.steps`` (training steps), ``bilevel.lr_w`` (the peak learning rate: w is the model that
  trains on the weighted data in reweight), ``bilevel.optimizer``, ``weight_decay``, ``clip``
  (absolute max grad norm here: there is no α), ``schedule`` and ``warmup_ratio``.
  Every other ``bilevel`` field and ``data.sources`` are ignored (the mixture replaces them).

The mixture is one training source of :func:`load_sources` (format ``messages`` by default), so
tokenisation, chat template, response-only labels and Arrow caching are those of reweight. Per step
t the loss is the mean of per-example token-mean CE over the global batch of B = global_batch
examples, L_t = (1/B) Σ_i ℓ_i, accumulated over micro-batches (and ranks, ×W as in reweight), and
the optimizer steps at lr_t = lr_w · s(t) with s the reweight schedule (``setup.lr_shape``).

Outputs in ``out``: ``model/`` (``save_pretrained`` of the model and tokenizer, written to a
temporary folder and renamed), ``trajectory.csv`` (step, loss, lr, grad_norm, seconds) and
``checkpoints/`` (resume with ``resume=True``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scalebio.llm import outputs
from scalebio.llm.config import Config
from scalebio.llm.data.sources import DataError, SourceSpec
from scalebio.llm.loop import setup
from scalebio.llm.loop.losses import per_example_loss

TRAJECTORY_FIELDS = ("step", "loss", "lr", "grad_norm", "seconds")
MIXTURE_FILE = "mixture.jsonl"  # what `scalebio mix` writes into its output folder


def resolve_mixture(data: str | Path) -> Path:
    """The mixture file: ``data`` itself, or ``data/mixture.jsonl`` for a ``scalebio mix`` folder.

    A folder without ``mixture.jsonl`` is passed on as is (a ``datasets`` save_to_disk folder).
    """
    p = Path(data).expanduser().resolve()
    if not p.exists():
        raise DataError(f"--data {p}: no such file or folder")
    if p.is_dir() and (p / MIXTURE_FILE).is_file():
        return p / MIXTURE_FILE
    return p


def _save_model(model, state: dict, tokenizer, dest: Path) -> None:
    """save_pretrained into ``dest.tmp`` then rename: a reader never sees half a model."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def sft(cfg: Config, data: str | Path, out: Path, *, data_format: str = "messages",
        resume: bool = False, overwrite: bool = False, progress: bool = True,
        stop_after: int | None = None) -> list[dict]:
    """Fine-tune ``cfg``'s model on the mixture ``data``; write ``out/model`` and trajectory.csv.

    Args:
      cfg: a reweight config (module docstring lists the fields used).
      data: a mixture file (.jsonl/.json/.parquet), a ``scalebio mix`` output folder or a
        ``datasets`` save_to_disk folder.
      out: output folder; an existing non-empty one is refused unless ``resume``/``overwrite``.
      data_format: the mixture's record format (``messages``, ``alpaca`` or ``sharegpt``).
      resume: continue from the newest checkpoint in ``out/checkpoints``.
      overwrite: replace ``out``.
      progress: show a tqdm bar.
      stop_after: end after that many steps of this call, leaving only checkpoints (tests).

    Returns:
      The trajectory rows ``{"step", "loss", "lr", "grad_norm", "seconds"}``.
    """
    mixture = resolve_mixture(data)
    mixture_spec = SourceSpec("mixture", str(mixture), data_format)
    # checks the model and every input (mixture, validation) before out is touched
    rank, world, device = setup.start_run(cfg, out, resume, overwrite, train=[mixture_spec])
    tokenizer, sources = setup.load_data(cfg, out, [mixture_spec])
    b, batch_size = cfg.bilevel, cfg.data.global_batch
    sampler = setup.build_sampler(cfg, sources, tokenizer.pad_token_id, rank, world, pooled=True)
    model = setup.load_run_model(cfg, device)
    engine = setup.build_engine(cfg, model, setup.model_optimizer(cfg, b.lr_w))
    lisa = setup.LisaDraws(cfg, {"w": engine})  # the draws of reweight's model w
    engines, rows, start = {"model": engine}, [], 0
    if resume:
        st = setup.resume_run(out, engines, lisa, rank)
        start, rows = st["step"], st["rows"]

    bar = setup.step_bar(cfg, start, "scalebio sft", progress, rank)
    for step in bar:
        t0 = time.perf_counter()
        lisa(step)
        lr = b.lr_w * setup.lr_shape(step, b.steps, b.warmup_ratio, b.schedule)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        for mb in sampler.batch(step).train:
            logits = engine.module(input_ids=mb["input_ids"].to(device),
                                   attention_mask=mb["attention_mask"].to(device)).logits
            part = per_example_loss(logits, mb["labels"].to(device)).sum() / batch_size
            (part * world).backward()  # engines average over ranks; `part` is already global
            loss += part.detach().double()
        if world > 1:
            dist.all_reduce(loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is not finite; lower bilevel.lr_w "
                                     "or set bilevel.clip")
        grad_norm = engine.step(lr, b.clip)
        rows.append({"step": step, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
                     "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}")
        done = step + 1
        if setup.checkpoint_due(cfg, done):
            setup.save_run(cfg, out, done, {"rows": rows}, engines, rank)
        if stop_after is not None and done - start >= stop_after:
            break
    if len(rows) == b.steps:  # a stopped run leaves only its checkpoints
        state = engine.full_model_state_dict()  # a collective on sharded engines: every rank
        if rank == 0:
            _save_model(model, state, tokenizer, out / "model")
            text = outputs.trajectory_csv(rows, TRAJECTORY_FIELDS)
            outputs.atomic_write_text(out / "trajectory.csv", text)
    return rows
