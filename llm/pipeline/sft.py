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
examples, L_t = (1/B) Σ_i ℓ_i, accumulated over micro-batches (and ranks, ×W as in train.py), and
the optimizer steps at lr_t = lr_w · s(t) with s the reweight schedule (:func:`train.lr_shape`).

Outputs in ``out``: ``model/`` (``save_pretrained`` of the model and tokenizer, written to a
temporary folder and renamed), ``trajectory.csv`` (step, loss, lr, grad_norm, seconds) and
``checkpoints/`` (resume with ``resume=True``).
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from scalebio.llm import outputs
from scalebio.llm.config import Config
from scalebio.llm.data.batching import StepSampler
from scalebio.llm.data.sources import DataError, SourceSpec, load_sources
from scalebio.llm.engines.engine import OptimizerSpec
from scalebio.llm.engines.lisa import active_blocks_for
from scalebio.llm.loop.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from scalebio.llm.loop.losses import per_example_loss
from scalebio.llm.loop.reweight import build_engine, lisa_from_config, lr_shape, start_run
from scalebio.llm.model import load_model

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


def trajectory_csv(rows: list[dict]) -> str:
    """CSV text of the rows, columns :data:`TRAJECTORY_FIELDS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TRAJECTORY_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


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
    if overwrite and Path(out).resolve() in mixture.parents:
        raise outputs.OutputError(f"{out}: --overwrite would delete the mixture {mixture}")
    rank, world, device, tokenizer = start_run(cfg, out, resume, overwrite)
    sources = load_sources([SourceSpec("mixture", str(mixture), data_format)],
                           cfg.data.validation_specs(), tokenizer, cfg.data.max_length,
                           cfg.data.cache_dir or str(out / "cache"))
    b, batch_size = cfg.bilevel, cfg.data.global_batch
    sampler = StepSampler(sources, "uniform", val_batch=cfg.data.val_batch,
                          micro_batches=cfg.data.micro_batches, seed=cfg.run.seed,
                          pad_token_id=tokenizer.pad_token_id, rank=rank, world_size=world,
                          global_batch=batch_size)
    model = load_model(path=cfg.model.path, config=cfg.model.config, dtype=cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code, seed=cfg.run.seed)
    model.to(device)
    lisa, num_blocks = lisa_from_config(cfg, model)
    engine = build_engine(cfg, model, OptimizerSpec(name=b.optimizer, lr=b.lr_w,
                                                     weight_decay=b.weight_decay), lisa)
    ckpt_root, rows, start = out / "checkpoints", [], 0
    if resume:
        ck = latest_checkpoint(ckpt_root)
        if ck is None:
            raise outputs.OutputError(f"{ckpt_root}: no complete checkpoint to resume from")
        start = int(torch.load(ck / "loop.pt", weights_only=False)["step"])
        if lisa is not None:  # the active set is a function of the step: re-draw, then load
            engine.set_active_blocks(active_blocks_for(start, cfg.run.seed, num_blocks, lisa, "w"))
        st = load_checkpoint(ck, {"model": engine}, rank)
        rows = st["rows"]
        torch.set_rng_state(st["torch_rng"])

    bar = tqdm(range(start, b.steps), desc="scalebio sft", initial=start, total=b.steps,
               disable=not progress or rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        if lisa is not None and step % lisa.period == 0:
            engine.set_active_blocks(active_blocks_for(step, cfg.run.seed, num_blocks, lisa, "w"))
        lr = b.lr_w * lr_shape(step, b.steps, b.warmup_ratio, b.schedule)
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
        if (cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0) or done == b.steps:
            save_checkpoint(ckpt_root, done, {"step": done, "rows": rows,
                                              "torch_rng": torch.get_rng_state()},
                            {"model": engine}, rank, cfg.run.keep_checkpoints)
        if stop_after is not None and done - start >= stop_after:
            break
    if len(rows) == b.steps:  # a stopped run leaves only its checkpoints
        state = engine.full_model_state_dict()  # a collective on sharded engines: every rank
        if rank == 0:
            _save_model(model, state, tokenizer, out / "model")
            outputs.atomic_write_text(out / "trajectory.csv", trajectory_csv(rows))
    return rows
