"""The run set-up shared by ``reweight``, ``sft`` and the baselines, written once.

In the order a run calls them: :func:`start_run` (threads, process group, device, output folder),
:func:`load_data` (tokenizer and tokenised sources), :func:`build_sampler` (the step batches),
:func:`load_run_model`, :func:`build_engine` (one model's engine, with the config's LISA policy),
:class:`LisaDraws` (called at every step: the blocks each engine trains), :func:`resume_run`,
then per step :func:`lr_shape`, :func:`checkpoint_due` and :func:`save_run`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from scalebio.llm import outputs, run_folder
from scalebio.llm.config import Config, ConfigError
from scalebio.llm.data import checks
from scalebio.llm.data.batching import StepSampler
from scalebio.llm.data.sources import SourceData, SourceSpec, load_sources
from scalebio.llm.data.tokenizer import load_tokenizer
from scalebio.llm.engines.engine import Engine, OptimizerSpec
from scalebio.llm.engines.lisa import LisaConfig, active_blocks_for
from scalebio.llm.loop.checkpoint import (
    check_world_size,
    load_checkpoint,
    newest_intact,
    save_checkpoint,
)
from scalebio.llm.loop.resume_config import (
    RESUMABLE_KEYS,
    RESUMABLE_NOTE,
    config_changes,
    config_record,
    refused_changes,
)

log = logging.getLogger(__name__)

MULTI_RANK_KINDS = ("ddp", "fsdp2", "deepspeed")  # engine kinds that need a process group


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (MASTER_PORT of a 1-rank group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_group(cfg: Config) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    needs_group = world > 1 or cfg.engine.kind in MULTI_RANK_KINDS
    if needs_group and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # started by hand, not by a launcher: 1-rank group
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", str(world))):
            os.environ.setdefault(k, v)  # DeepSpeed reads these even for one rank
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1 and cfg.engine.kind == "single":  # each rank would train its own models
        raise ConfigError(f"engine.kind: 'single' runs one process, but {world} were launched; "
                          "use ddp, fsdp2 or deepspeed")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def start_run(cfg: Config, out: Path, resume: bool = False, overwrite: bool = False,
              train: list[SourceSpec] | None = None,
              tracker: bool = False) -> tuple[int, int, torch.device]:
    """Threads, process group (when the engine or the launcher asks for one), the checks that
    need no data (:func:`scalebio.llm.preflight.check_run` on ``train``, default
    ``data.sources``, and the tracker if ``tracker``), the output folder (rank 0, then a
    barrier; ``--overwrite`` refused when it holds an input), and with ``resume`` the checkpoint
    to resume from, whose config must match (:func:`resume_point`).
    Returns (rank, world size, device)."""
    from scalebio.llm import preflight

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rank, world, device = _process_group(cfg)
    train = cfg.data.source_specs() if train is None else train
    preflight.check_run(cfg, train, tracker=tracker)
    if rank == 0:
        outputs.prepare_out_dir(out, resume, overwrite, preflight.run_inputs(cfg, train))
    if dist.is_initialized():
        dist.barrier()
    if resume:
        _RESUME_FROM[Path(out).resolve()] = resume_point(cfg, out, rank)
    return rank, world, device


_RESUME_FROM: dict[Path, Path] = {}  # out -> the checkpoint start_run checked


def resume_point(cfg: Config, out: Path, rank: int = 0) -> Path:
    """The newest intact checkpoint in ``out/checkpoints`` (damaged newer ones are named in a
    warning and skipped), after checking that its config is ``cfg`` up to the keys that may
    change on a resume (``resume_config.RESUMABLE_KEYS``; such changes are logged and appended
    to ``out/resume_log.jsonl``). ``ConfigError`` lists any other changed key."""
    root = Path(out) / "checkpoints"
    ck = newest_intact(root, rank)
    if ck is None:
        raise outputs.OutputError(f"{root}: no intact checkpoint to resume from")
    check_world_size(ck)  # per-rank (DeepSpeed) states: the world size that wrote them
    stored = torch.load(ck / "loop.pt", weights_only=False).get("config")
    if stored is None:
        log.warning("%s stores no config (an older version wrote it): the resumed config "
                    "cannot be checked against it", ck)
        return ck
    current = config_record(cfg)
    changes = config_changes(stored, current)
    refused = refused_changes(changes, current["values"])
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in
                           ((k, *v) for k, v in refused.items()))
        raise ConfigError(f"--resume: the config differs from the one {ck} was saved with: "
                          f"{listed}. Only {', '.join(RESUMABLE_KEYS)} may change on a resume "
                          f"({RESUMABLE_NOTE}); "
                          "restore the others, or start a new run in another --out")
    if changes and rank == 0:
        log.warning("--resume from %s with changed %s", ck.name,
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": ck.name,
                 "changed": {k: list(v) for k, v in changes.items()}}
        with open(Path(out) / "resume_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    return ck


def load_data(cfg: Config, out: Path,
              train: list[SourceSpec] | None = None) -> tuple[object, SourceData]:
    """The config's tokenizer and tokenised data: ``train`` (default ``data.sources``) and
    ``data.validation``, cached in ``data.cache_dir`` (default ``out/cache``)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    d = cfg.data
    # the stratified quota applies to the config's own sources (sft pools its mixture)
    quota = d.per_source if train is None and d.batch_mode == "stratified" else None
    train, val = d.source_specs() if train is None else train, d.validation_specs()
    with checks.diagnosed([*train, *val], d.max_length):
        data = load_sources(train, val, tokenizer, d.max_length, d.cache_dir or str(out / "cache"),
                            num_proc=d.num_proc)
    checks.check_data(data, train, val, tokenizer, quota)
    return tokenizer, data


def build_sampler(cfg: Config, data: SourceData, pad_token_id: int, rank: int = 0,
                  world: int = 1, pooled: bool = False) -> StepSampler:
    """The step sampler of the config's ``data`` section and ``run.seed``.

    ``pooled``: draw ``data.global_batch`` examples per step from all training data at once,
    whatever ``data.batch_mode`` says (sft: the mixture is the one source).
    """
    d = cfg.data
    mode = "uniform" if pooled else d.batch_mode
    stratified = mode == "stratified"
    return StepSampler(data, mode, val_batch=d.val_batch, **d.split_args(world, mode),
                       seed=cfg.run.seed, pad_token_id=pad_token_id, rank=rank, world_size=world,
                       per_source=d.per_source if stratified else None,
                       global_batch=None if stratified else d.global_batch)


def load_run_model(cfg: Config, device: torch.device):
    """A fresh model of the ``model`` section on ``device``, initialised from ``run.seed`` (the
    same seed gives the same weights).

    Under the sharding engines (``engine.kind`` fsdp2, or deepspeed with ``zero_stage: 3``) the
    model is *deferred* instead: parameters on the meta device, no weights read yet. Copying it
    (the second ScaleBiO copy) is free, and :func:`build_engine` shards it and loads only each
    rank's share (llm/engines/materialize.py), with the same initial weights."""
    from scalebio.llm.engines.materialize import ModelSource, deferred_model

    m, e = cfg.model, cfg.engine
    source = ModelSource(path=m.path, config=m.config, dtype=m.dtype,
                         trust_remote_code=m.trust_remote_code, seed=cfg.run.seed,
                         attn_implementation=m.attn_implementation,
                         gradient_checkpointing=m.gradient_checkpointing)
    if e.kind == "fsdp2" or (e.kind == "deepspeed" and e.zero_stage == 3):
        return deferred_model(source)
    return source.load().to(device)


def model_optimizer(cfg: Config, lr: float) -> OptimizerSpec:
    """The ``bilevel`` optimizer of the models (u, w, sft's model) at peak learning rate ``lr``."""
    return OptimizerSpec(name=cfg.bilevel.optimizer, lr=lr, weight_decay=cfg.bilevel.weight_decay)


def build_engine(cfg: Config, model, opt: OptimizerSpec) -> Engine:
    """``model``'s engine of kind ``engine.kind``, with the ``lisa`` section's policy (``model``
    as :func:`load_run_model` returns it)."""
    e, lisa = cfg.engine, cfg.lisa if cfg.lisa.enabled else None
    if e.kind in ("single", "ddp"):
        from scalebio.llm.engines.torch_engine import build_single_engine

        return build_single_engine(model, opt, lisa, ddp=e.kind == "ddp",
                                   fp32_grad_accum=e.fp32_grad_accum)
    if e.kind == "fsdp2":
        from scalebio.llm.engines.torch_engine import build_fsdp2_engine

        return build_fsdp2_engine(model, opt, lisa, bf16=e.bf16,
                                  fp32_grad_accum=e.fp32_grad_accum)
    from scalebio.llm.engines.deepspeed_zero import build_deepspeed_engine

    return build_deepspeed_engine(
        model, opt, lisa, zero_stage=e.zero_stage, offload=e.offload, bf16=e.bf16,
        fp32_grad_accum=e.fp32_grad_accum,
    )


class LisaDraws:
    """The LISA blocks of each engine, a pure function of (``run.seed``, step, stream).

    ``engines`` maps a draw stream (``"u"``, ``"w"``) to its engine; call the object at the start
    of every step (it switches at the start of each ``lisa.period``) and with ``resume=True``
    before restoring a checkpoint (whose optimizer state is that of the step's blocks).
    Does nothing when LISA is off.
    """

    def __init__(self, cfg: Config, engines: dict[str, Engine]):
        self.lisa: LisaConfig | None = cfg.lisa if cfg.lisa.enabled else None
        self.seed, self.engines = cfg.run.seed, engines
        self.num_blocks = len(next(iter(engines.values())).layout.blocks)
        if self.lisa is not None and self.lisa.n_active > self.num_blocks:
            raise ConfigError(f"lisa.n_active: {self.lisa.n_active} > the model's "
                              f"{self.num_blocks} blocks")

    def __call__(self, step: int, resume: bool = False) -> None:
        if self.lisa is None or (step % self.lisa.period and not resume):
            return
        for stream, engine in self.engines.items():
            engine.set_active_blocks(
                active_blocks_for(step, self.seed, self.num_blocks, self.lisa, stream))


def lr_shape(step: int, total: int, warmup_ratio: float, kind: str) -> float:
    """s(t) ∈ [0, 1]: linear warm-up over ⌊warmup·T⌋ steps, then cosine to 0 (or constant)."""
    warm = int(warmup_ratio * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_bar(cfg: Config, start: int, desc: str, progress: bool, rank: int):
    """The steps ``start .. bilevel.steps - 1`` under a tqdm bar (rank 0 only)."""
    total = cfg.bilevel.steps
    return tqdm(range(start, total), desc=desc, initial=start, total=total,
                disable=not progress or rank != 0)


def resume_run(out: Path, engines: dict[str, Engine], lisa: LisaDraws, rank: int) -> dict:
    """Restore the newest checkpoint in ``out/checkpoints``: the LISA blocks of its step, then
    the engines' states (saved over those blocks) and the torch RNG. Returns the loop state
    (``step`` and what the loop saved with :func:`save_run`)."""
    ck = _RESUME_FROM.pop(Path(out).resolve(), None) or newest_intact(out / "checkpoints", rank)
    if ck is None:
        raise outputs.OutputError(f"{out / 'checkpoints'}: no intact checkpoint to resume from")
    lisa(int(torch.load(ck / "loop.pt", weights_only=False)["step"]), resume=True)
    state = load_checkpoint(ck, engines, rank)
    torch.set_rng_state(state["torch_rng"])
    return state


def checkpoint_due(cfg: Config, done: int) -> bool:
    """A checkpoint after ``done`` steps: every ``run.checkpoint_every`` steps and the last."""
    every = cfg.run.checkpoint_every
    return bool(every and done % every == 0) or done == cfg.bilevel.steps


def save_run(cfg: Config, out: Path, done: int, state: dict, engines: dict[str, Engine],
             rank: int) -> None:
    """Checkpoint ``out/checkpoints/step_<done>``: the engines' states and the loop state
    ``{"step": done, **state, "torch_rng": ...}`` that :func:`resume_run` returns."""
    loop_state = {"step": done, **state, "torch_rng": torch.get_rng_state(),
                  "config": config_record(cfg)}
    save_checkpoint(out / "checkpoints", done, loop_state, engines, rank,
                    cfg.run.keep_checkpoints)
    if rank == 0:  # the new run can be resumed: an old run that --overwrite set aside can go
        run_folder.commit(out)
