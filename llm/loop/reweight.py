"""ScaleBiO for causal LMs: one explicit loop that calls the core's penalty surrogate.

Per step t (u = "z" tracks the lower solution, w = "y" is pulled by validation, λ = θ):
  1. α_t and the learning-rate factor; a LISA draw when t % period == 0 (or on resume).
  2. The sampler's batch(t): this rank's train/val micro-batches, global per-source counts c_k and
     the global number of supervised validation tokens N_tok (pure function of (seed, t)).
  3. Per micro-batch pair: h_u, h_w = Σ_{i: s_i=k} ℓ_i / c_k, f = Σ token CE / N_tok, and
     S = penalty_surrogate(θ, f, h_w, h_u, π·h, α). Every sign and α lives in that call. S is
     linear in these partial sums, so accumulating S.backward() gives the global-batch gradients.
     The backward is scaled by the world size W because the engines average gradients over ranks
     while our partial sums are already global: W · mean = sum.
  4. θ.grad is averaged over ranks; u, w and θ step at their scheduled learning rates.
  5. Log a trajectory row; checkpoint every N steps.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from scalebio import make_simplex
from scalebio import weights as simplex_weights
from scalebio.llm import outputs
from scalebio.llm.config import Config, ConfigError
from scalebio.llm.data.batching import StepSampler
from scalebio.llm.data.sources import load_sources
from scalebio.llm.data.tokenizer import load_tokenizer
from scalebio.llm.engines.engine import OptimizerSpec
from scalebio.llm.engines.lisa import LisaConfig, active_blocks_for, find_decoder_blocks
from scalebio.llm.loop.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from scalebio.llm.loop.step import Combine, bilevel_step
from scalebio.llm.model import copy_model, load_model


# ---------------------------------------------------------------- set-up helpers
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dist_setup(cfg: Config) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    needs_group = world > 1 or cfg.engine.kind in ("ddp", "fsdp2", "deepspeed")
    if needs_group and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # started by hand, not by a launcher: 1-rank group
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
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


def start_run(cfg: Config, out: Path, resume: bool, overwrite: bool):
    """Threads, process group, the output folder (rank 0, then a barrier) and the tokenizer:
    the start shared by ``reweight`` and ``sft``. Returns (rank, world, device, tokenizer)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rank, world, device = _dist_setup(cfg)
    if rank == 0:
        outputs.prepare_out_dir(out, resume, overwrite)
    if dist.is_initialized():
        dist.barrier()
    return rank, world, device, load_tokenizer(cfg.model.tokenizer or cfg.model.path)


def build_engine(cfg: Config, model, opt: OptimizerSpec, lisa: LisaConfig | None):
    e = cfg.engine
    if e.kind in ("single", "ddp"):
        from scalebio.llm.engines.torch_ddp import build_single_engine

        return build_single_engine(model, opt, lisa, ddp=e.kind == "ddp")
    if e.kind == "fsdp2":
        from scalebio.llm.engines.fsdp2 import build_fsdp2_engine

        return build_fsdp2_engine(model, opt, lisa, bf16=e.bf16)
    from scalebio.llm.engines.deepspeed_zero import build_deepspeed_engine

    return build_deepspeed_engine(
        model, opt, lisa, zero_stage=e.zero_stage, offload=e.offload, bf16=e.bf16
    )


def lr_shape(step: int, total: int, warmup_ratio: float, kind: str) -> float:
    """s(t) ∈ [0, 1]: linear warm-up over ⌊warmup·T⌋ steps, then cosine to 0 (or constant)."""
    warm = int(warmup_ratio * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def alpha_at(step: int, cfg: Config) -> tuple[float, float]:
    """α_t = α₀ τ^⌊t/N⌋ and the learning-rate factor α₀/α_t (scalebio.geometric_alpha's rule)."""
    b = cfg.bilevel
    alpha = b.alpha * (b.tau ** (step // b.alpha_every) if b.tau > 1 else 1.0)
    return alpha, b.alpha / alpha


def _name_map(d: dict | None, names: tuple[str, ...], key: str) -> dict[int, float] | list | None:
    if d is None:
        return None
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(
            f"bilevel.{key}: unknown source name(s) {sorted(unknown)}; sources are {list(names)}"
        )
    return {names.index(n): float(v) for n, v in d.items()}


def _vector(d: dict[int, float] | None, k: int, default: float | None, key: str, names):
    if d is None:
        return None
    if default is None and len(d) != k:
        missing = [names[i] for i in range(k) if i not in d]
        raise ConfigError(f"bilevel.{key}: give a value for every source; missing {missing}")
    return [d.get(i, default) for i in range(k)]


def lisa_from_config(cfg: Config, model) -> tuple[LisaConfig | None, int]:
    """The run's LISA settings (None when off) and the model's number of decoder blocks."""
    if not cfg.lisa.enabled:
        return None, 0
    lisa = LisaConfig(n_active=cfg.lisa.n_active, period=cfg.lisa.period,
                      train_embeddings=cfg.lisa.train_embeddings, train_head=cfg.lisa.train_head,
                      joint=cfg.lisa.joint)
    num_blocks = len(find_decoder_blocks(model)[1])
    if lisa.n_active > num_blocks:
        raise ConfigError(f"lisa.n_active: {lisa.n_active} > the model's {num_blocks} blocks")
    return lisa, num_blocks


def _model_opt(cfg: Config, lr: float) -> OptimizerSpec:
    b = cfg.bilevel
    return OptimizerSpec(name=b.optimizer, lr=lr, weight_decay=b.weight_decay)


# ---------------------------------------------------------------- the loop
def reweight(
    cfg: Config,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    raw_config: dict | None = None,
    stop_after: int | None = None,
):
    """Learn mixture weights; write weights.json, trajectory.csv and plots to ``out``.

    ``stop_after`` ends the loop early after that many steps (for tests of kill/resume).
    Returns the weights.json document.
    """
    rank, world, device, tokenizer = start_run(cfg, out, resume, overwrite)
    data = load_sources(
        cfg.data.source_specs(),
        cfg.data.validation_specs(),
        tokenizer,
        cfg.data.max_length,
        cfg.data.cache_dir or str(out / "cache"),
    )
    names, k = data.names, len(data.names)
    stratified = cfg.data.batch_mode == "stratified"
    sampler = StepSampler(
        data,
        cfg.data.batch_mode,
        val_batch=cfg.data.val_batch,
        micro_batches=cfg.data.micro_batches,
        seed=cfg.run.seed,
        pad_token_id=tokenizer.pad_token_id,
        rank=rank,
        world_size=world,
        per_source=cfg.data.per_source if stratified else None,
        global_batch=None if stratified else cfg.data.global_batch,
    )

    b = cfg.bilevel
    spec = make_simplex(
        k,
        geometry=b.geometry,
        prior=_vector(_name_map(b.prior, names, "prior"), k, None, "prior", names),
        floor=_vector(_name_map(b.floor, names, "floor"), k, 0.0, "floor", names),
        cap=_vector(_name_map(b.cap, names, "cap"), k, 1.0, "cap", names),
        fixed=_name_map(b.fixed, names, "fixed"),
    )
    model_w = load_model(
        path=cfg.model.path,
        config=cfg.model.config,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.run.seed,
    )
    model_u = copy_model(model_w)
    model_w.to(device)
    model_u.to(device)
    lisa, num_blocks = lisa_from_config(cfg, model_w)
    eng_u = build_engine(cfg, model_u, _model_opt(cfg, b.lr_u), lisa)
    eng_w = build_engine(cfg, model_w, _model_opt(cfg, b.lr_w), lisa)

    theta = torch.zeros(k, dtype=torch.float32, device=device, requires_grad=True)  # λ: fp32 always
    opt_cls = torch.optim.AdamW if b.lambda_optimizer == "adamw" else torch.optim.SGD
    opt_theta = opt_cls([theta], lr=b.lr_lambda, **({"weight_decay": 0.0}))  # method.md quirk 8

    combine = Combine(spec)

    rows: list[dict] = []
    weights_sum = torch.zeros(k, dtype=torch.float64)
    start = 0
    ckpt_root = out / "checkpoints"
    if resume:
        ck = latest_checkpoint(ckpt_root)
        if ck is None:
            raise outputs.OutputError(f"{ckpt_root}: no complete checkpoint to resume from")
        start = int(torch.load(ck / "loop.pt", weights_only=False)["step"])
        if lisa is not None:  # LISA state is a function of the step: re-draw, then load states
            for name, eng in (("u", eng_u), ("w", eng_w)):
                eng.set_active_blocks(
                    active_blocks_for(start, cfg.run.seed, num_blocks, lisa, name)
                )
        st = load_checkpoint(ck, {"u": eng_u, "w": eng_w}, rank)
        with torch.no_grad():
            theta.copy_(st["theta"])
        opt_theta.load_state_dict(st["opt_theta"])
        rows, weights_sum = st["rows"], st["weights_sum"]
        torch.set_rng_state(st["torch_rng"])

    tracker = _tracker(cfg, out, raw_config) if rank == 0 else None
    bar = tqdm(
        range(start, b.steps),
        desc="scalebio",
        disable=not progress or rank != 0,
        initial=start,
        total=b.steps,
    )
    for step in bar:
        t0 = time.perf_counter()
        alpha, lr_factor = alpha_at(step, cfg)
        scale = lr_shape(step, b.steps, b.warmup_ratio, b.schedule) * lr_factor
        if lisa is not None and step % lisa.period == 0:
            for name, eng in (("u", eng_u), ("w", eng_w)):
                eng.set_active_blocks(active_blocks_for(step, cfg.run.seed, num_blocks, lisa, name))
        batch = sampler.batch(step)
        lrs = (b.lr_u * scale, b.lr_w * scale, b.lr_lambda * scale)
        clip = None if b.clip is None else b.clip * alpha
        try:
            m = bilevel_step(eng_u, eng_w, theta, opt_theta, batch, combine, alpha, lrs, clip,
                             b.order, world, device)
        except FloatingPointError as e:  # name the step and the usual cure
            raise FloatingPointError(
                f"step {step}: {e}; the models diverged: lower bilevel.lr_u / bilevel.lr_w "
                "or set bilevel.clip"
            ) from None
        if not torch.isfinite(theta).all():
            raise FloatingPointError(f"step {step}: λ became non-finite; lower bilevel.lr_lambda")
        s, pi = m["sums"], m["weights"]  # π is π(θ_t), the weights this step was evaluated at
        weights_sum += pi
        row = {
            "step": step,
            "alpha": alpha,
            "lr_scale": scale,
            "val_loss": float(s[0]),
            "train_loss_w": float(s[1]),
            "train_loss_u": float(s[2]),
            "gap": float(s[1] - s[2]),
            "grad_norm_lambda": m["grad_norm_lambda"],
            "grad_norm_u": m["grad_norm_u"],
            "grad_norm_w": m["grad_norm_w"],
            "seconds": time.perf_counter() - t0,
        }
        for i, n in enumerate(names):
            row[f"weight/{n}"] = float(pi[i])
            present = float(batch.counts[i]) > 0  # h sums to the source's mean loss when present
            row[f"loss_w/{n}"] = float(s[3 + i]) if present else float("nan")
            row[f"loss_u/{n}"] = float(s[3 + k + i]) if present else float("nan")
        rows.append(row)
        if tracker is not None:
            tracker.log({k_: v for k_, v in row.items() if k_ != "step"}, step=step)
        if progress and rank == 0:
            top = max(names, key=lambda n: row[f"weight/{n}"])
            bar.set_postfix(
                val=f"{row['val_loss']:.3f}",
                gap=f"{row['gap']:.2g}",
                top=f"{top}:{row[f'weight/{top}']:.2f}",
            )
        done = step + 1
        if (cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0) or done == b.steps:
            save_checkpoint(
                ckpt_root,
                done,
                {
                    "step": done,
                    "theta": theta.detach().cpu(),
                    "opt_theta": opt_theta.state_dict(),
                    "rows": rows,
                    "weights_sum": weights_sum,
                    "torch_rng": torch.get_rng_state(),
                },
                {"u": eng_u, "w": eng_w},
                rank,
                cfg.run.keep_checkpoints,
            )
        if stop_after is not None and done - start >= stop_after:
            break
    if tracker is not None:
        tracker.finish()
    final = simplex_weights(theta.detach().double(), spec).cpu()
    averaged = weights_sum / max(1, len(rows))
    extra = {
        "steps": len(rows),
        "names": list(names),
        "world_size": world,
        "engine": cfg.engine.kind,
        "dropped_examples": dict(data.dropped),
        "config": raw_config,
    }
    if rank == 0 and len(rows) == b.steps:  # a stopped run leaves only its checkpoints
        outputs.write_weights_json(out / "weights.json", names, final, averaged, extra)
        outputs.atomic_write_text(out / "trajectory.csv", outputs.trajectory_csv(rows, names))
        outputs.plot_run(out, rows, names)
    return {
        "weights": dict(zip(names, final.tolist())),
        "averaged_weights": dict(zip(names, averaged.tolist())),
        "rows": rows,
        **extra,
    }


def _tracker(cfg: Config, out: Path, raw_config: dict | None):
    """An accelerate tracker (TensorBoard by default, W&B if asked), or None."""
    if cfg.run.tracker == "none":
        return None
    if cfg.run.tracker == "wandb":
        from accelerate.tracking import WandBTracker

        tr = WandBTracker("scalebio")
    else:
        from accelerate.tracking import TensorBoardTracker

        tr = TensorBoardTracker("tb", str(out))
    tr.start()
    if raw_config is not None:
        tr.store_init_configuration(_flatten(raw_config))
    return tr


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, v in d.items():
        name = f"{prefix}{key}"
        if isinstance(v, dict):
            flat.update(_flatten(v, name + "."))
        elif isinstance(v, (int, float, str, bool)):
            flat[name] = v
        else:
            flat[name] = str(v)
    return flat
