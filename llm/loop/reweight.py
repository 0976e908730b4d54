"""ScaleBiO for causal LMs: one explicit loop that calls the core's penalty surrogate.

Set-up (llm/loop/setup.py, shared with sft and the baselines): process group, data, sampler, the
two model copies u and w (identical at the start) with their engines, λ = θ and its optimizer,
and, on resume, the newest checkpoint. Then per step t (u = "z" tracks the lower solution, w = "y"
is pulled by validation, λ = θ):
  1. α_t and the learning-rate factor (the core's geometric_alpha); a LISA draw when
     t % period == 0 (or on resume).
  2. The sampler's batch(t): this rank's train/val micro-batches, global per-source counts c_k and
     the global number of supervised validation tokens N_tok (pure function of (seed, t)).
  3. Per micro-batch pair: h_u, h_w = Σ_{i: s_i=k} ℓ_i / c_k, f = Σ token CE / N_tok, and
     S = penalty_surrogate(θ, f, h_w, h_u, π·h, α). Every sign and α lives in that call. S is
     linear in these partial sums, so accumulating backwards gives the global-batch gradients;
     llm/loop/step.py runs one backward after each forward (one autograd graph alive at a time).
     The backward is scaled by the world size W because the engines average gradients over ranks
     while our partial sums are already global: W · mean = sum.
  4. θ.grad is averaged over ranks; u, w and θ step at their scheduled learning rates (θ not
     during the first bilevel.lambda_warmup_steps; with bilevel.inner_steps_u = K > 1, u first
     takes K − 1 steps alone on the batches sampler.batch(t, i), i = 1 … K − 1, drawn from
     their own streams so a resumed run redraws them; llm/loop/step.py gives the order).
  5. Log a trajectory row; checkpoint every N steps.
At the end (rank 0): weights.json, trajectory.csv and plots, with the run diagnostics and their
verdict (``scalebio.llm.loop.diagnostics``); bilevel.stop_when_stable ends the loop early once
the weights stop moving.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from scalebio import constant_alpha, geometric_alpha, make_simplex
from scalebio import weights as simplex_weights
from scalebio.llm import outputs, run_folder
from scalebio.llm.config import Config, ConfigError
from scalebio.llm.loop import diagnostics, setup
from scalebio.llm.loop.step import Combine, bilevel_step
from scalebio.llm.model import copy_model
from scalebio.llm.plan import preflight

log = logging.getLogger(__name__)


def reweight(
    cfg: Config,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    raw_config: dict | None = None,
    stop_after: int | None = None,
    plan_check: bool = True,
):
    """Learn mixture weights; write weights.json, trajectory.csv and plots to ``out``.

    ``stop_after`` ends the loop early after that many steps (for tests of kill/resume).
    ``plan_check``: on a GPU, refuse before loading data or weights a run whose memory plan
    (``scalebio plan``) does not fit the device. Returns the weights.json document.
    """
    # set-up (module docstring)
    rank, world, device = setup.start_run(cfg, out, resume, overwrite, tracker=True)
    plan = preflight(cfg, world, device) if plan_check else None
    tokenizer, data = setup.load_data(cfg, out)
    names, k, b = data.names, len(data.names), cfg.bilevel
    sampler = setup.build_sampler(cfg, data, tokenizer.pad_token_id, rank, world)
    combine = Combine(_simplex(cfg, names))
    model_w = setup.load_run_model(cfg, device)
    model_u = copy_model(model_w)
    engines = {"u": setup.build_engine(cfg, model_u, setup.model_optimizer(cfg, b.lr_u)),
               "w": setup.build_engine(cfg, model_w, setup.model_optimizer(cfg, b.lr_w))}
    lisa = setup.LisaDraws(cfg, engines)
    theta = torch.zeros(k, dtype=torch.float32, device=device, requires_grad=True)  # λ: fp32 always
    opt_cls = torch.optim.AdamW if b.lambda_optimizer == "adamw" else torch.optim.SGD
    opt_theta = opt_cls([theta], lr=b.lr_lambda, weight_decay=0.0)  # docs/method.md, pitfall 8
    rows, weights_sum, start = [], torch.zeros(k, dtype=torch.float64), 0
    if resume:
        st = setup.resume_run(out, engines, lisa, rank)
        start, rows, weights_sum = st["step"], st["rows"], st["weights_sum"]
        with torch.no_grad():
            theta.copy_(st["theta"])
        opt_theta.load_state_dict(st["opt_theta"])
    alpha_at = geometric_alpha(b.tau, b.alpha_every) if b.tau > 1 else constant_alpha()
    tracker = _tracker(cfg, out, raw_config) if rank == 0 else None

    bar = setup.step_bar(cfg, start, "scalebio", progress, rank)
    same, stopped_at = 0, None  # steps u and w were indistinguishable; early stop's step
    for step in bar:
        t0 = time.perf_counter()
        # 1. α_t, learning rates, LISA draw
        alpha, lr_factor = alpha_at(step, float(b.alpha))  # float: a YAML `alpha: 1` is an int
        scale = setup.lr_shape(step, b.steps, b.warmup_ratio, b.schedule) * lr_factor
        lisa(step)
        # 2.–4. the batch, the surrogate's backward, the three optimizer steps
        batch = sampler.batch(step)
        lrs = (b.lr_u * scale, b.lr_w * scale, b.lr_lambda * scale)
        clip = None if b.clip is None else b.clip * alpha
        try:
            m = bilevel_step(engines["u"], engines["w"], theta, opt_theta, batch, combine, alpha,
                             lrs, clip, b.order, world, device,
                             [sampler.batch(step, i) for i in range(1, b.inner_steps_u)],
                             step >= b.lambda_warmup_steps)
        except FloatingPointError as e:  # name the step and the usual cure
            _stop(out, rows, names, rank, f"step {step}: {e}; the models diverged: lower "
                  "bilevel.lr_u / bilevel.lr_w or set bilevel.clip")
        if not torch.isfinite(theta).all():
            _stop(out, rows, names, rank, f"step {step}: λ became non-finite; lower "
                  "bilevel.lr_lambda")
        row = _row(step, alpha, scale, m, batch.counts, names, time.perf_counter() - t0)
        _check_losses(out, rows, row, names, rank, math.log(len(tokenizer)))
        same = same + 1 if row["gap"] == 0 or m["grad_norm_lambda"] == 0 else 0
        if same == FROZEN_STEPS:
            log.warning("step %d: u and w have stayed identical for %d steps (equal training "
                        "losses, bit for bit), so λ's gradient is 0 or rounding noise and the "
                        "weights cannot learn; bilevel.alpha %g is too large for the learning "
                        "rates: lower it", step, FROZEN_STEPS, alpha)
        # 5. log, checkpoint
        weights_sum += m["weights"]  # π(θ_t), the weights this step was evaluated at
        rows.append(row)
        _log(tracker, bar if progress and rank == 0 else None, rows[-1], names)
        done = step + 1
        if setup.checkpoint_due(cfg, done):
            state = {"theta": theta.detach().cpu(), "opt_theta": opt_theta.state_dict(),
                     "rows": rows, "weights_sum": weights_sum}
            setup.save_run(cfg, out, done, state, engines, rank)
        if stop_after is not None and done - start >= stop_after:
            break
        if b.stop_when_stable is not None and diagnostics.is_stable(  # the λ warm-up is no news
                rows[b.lambda_warmup_steps:], names,
                diagnostics.stop_window(b.steps, b.diagnostics_window), b.stop_when_stable):
            stopped_at = step
            break
    if tracker is not None:
        tracker.finish()
    final = simplex_weights(theta.detach().double(), combine.spec).cpu()
    averaged = weights_sum / max(1, len(rows))
    diag = diagnostics.diagnose(rows, names, b.diagnostics_window, b.stop_when_stable, stopped_at)
    extra = {"steps": len(rows), "names": list(names), "world_size": world,
             "engine": cfg.engine.kind, "dropped_examples": dict(data.dropped),
             "diagnostics": diag, "config": raw_config, **_memory(plan, device)}
    # a run stopped by stop_after leaves only its checkpoints; one stable early writes it all
    if rank == 0 and (len(rows) == b.steps or stopped_at is not None):
        outputs.write_weights_json(out / "weights.json", names, final, averaged, extra)
        outputs.atomic_write_text(out / "trajectory.csv",
                                  outputs.trajectory_csv(rows, outputs.reweight_fields(names)))
        outputs.plot_run(out, rows, names, diag)
    if rank == 0:
        run_folder.finish(out)
    return {"weights": dict(zip(names, final.tolist())),
            "averaged_weights": dict(zip(names, averaged.tolist())), "rows": rows, **extra}


# ---------------------------------------------------------------- helpers of the loop
def _memory(plan, device: torch.device) -> dict:
    """On a GPU: the peak allocated on this rank and what ``scalebio plan`` predicted (GiB)."""
    if device.type != "cuda":
        return {}
    out = {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    if plan is not None:
        out["planned_peak_gib"] = plan.prediction.peak / 2**30
    return out


# A loss this many times that of uniform guessing (ln V nats per token) means the models have
# diverged: no trained or untrained model is that far off, while overflow is still steps away.
EXPLODED = 100.0
# u and w give bit-identical losses (and λ a zero gradient: the penalty's two terms cancel) only
# while they are identical; at step 0 they always are, so only a longer run of such steps is news.
FROZEN_STEPS = 5


def _stop(out: Path, rows: list[dict], names, rank: int, msg: str):
    """Write trajectory.csv up to the last good step, then stop the run with ``msg``."""
    if rank == 0 and rows:
        outputs.atomic_write_text(out / "trajectory.csv",
                                  outputs.trajectory_csv(rows, outputs.reweight_fields(names)))
        msg += f" (trajectory.csv holds steps 0-{rows[-1]['step']})"
    raise FloatingPointError(msg)


def _check_losses(out: Path, rows: list[dict], row: dict, names, rank: int,
                  uniform_loss: float) -> None:
    """Stop on a non-finite loss, or one beyond :data:`EXPLODED` × the uniform guess's."""
    losses = {k: row[k] for k in ("val_loss", "train_loss_w", "train_loss_u")}
    limit = EXPLODED * uniform_loss
    shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    if not all(math.isfinite(v) for v in losses.values()):
        _stop(out, rows, names, rank, f"step {row['step']}: the losses are not finite ({shown}); "
              "the models diverged: lower bilevel.lr_u / bilevel.lr_w or set bilevel.clip")
    if max(losses.values()) > limit:
        _stop(out, rows, names, rank, f"step {row['step']}: the losses exploded ({shown}; more "
              f"than {EXPLODED:g} × ln(vocabulary) = {limit:.4g}); lower bilevel.lr_u / "
              "bilevel.lr_w or set bilevel.clip")

def _simplex(cfg: Config, names: tuple[str, ...]):
    """The simplex of the ``bilevel`` section (geometry, prior, floor, cap, fixed) over
    ``names``; per-source values are given by source name."""
    b, k = cfg.bilevel, len(names)
    return make_simplex(
        k,
        geometry=b.geometry,
        prior=_vector(_name_map(b.prior, names, "prior"), k, None, "prior", names),
        floor=_vector(_name_map(b.floor, names, "floor"), k, 0.0, "floor", names),
        cap=_vector(_name_map(b.cap, names, "cap"), k, 1.0, "cap", names),
        fixed=_name_map(b.fixed, names, "fixed"),
    )


def _name_map(d: dict | None, names: tuple[str, ...], key: str) -> dict[int, float] | None:
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


def _row(step: int, alpha: float, scale: float, m: dict, counts, names, seconds: float) -> dict:
    """One trajectory row (columns: outputs.reweight_fields). Per-source losses are NaN for a
    source absent from the step's batch; present, h sums to the source's mean loss."""
    s, pi, k = m["sums"], m["weights"], len(names)
    row = {"step": step, "alpha": alpha, "lr_scale": scale, "val_loss": float(s[0]),
           "train_loss_w": float(s[1]), "train_loss_u": float(s[2]), "gap": float(s[1] - s[2]),
           "grad_norm_lambda": m["grad_norm_lambda"], "grad_norm_u": m["grad_norm_u"],
           "grad_norm_w": m["grad_norm_w"], "seconds": seconds}
    for i, n in enumerate(names):
        present = float(counts[i]) > 0
        row[f"weight/{n}"] = float(pi[i])
        row[f"loss_w/{n}"] = float(s[3 + i]) if present else float("nan")
        row[f"loss_u/{n}"] = float(s[3 + k + i]) if present else float("nan")
        row[f"grad_lambda/{n}"] = float(m["grad_lambda"][i])
    return row


def _log(tracker, bar, row: dict, names) -> None:
    """The row to the tracker (if any) and a summary on the progress bar (if shown)."""
    if tracker is not None:
        tracker.log({key: v for key, v in row.items() if key != "step"}, step=row["step"])
    if bar is not None:
        top = max(names, key=lambda n: row[f"weight/{n}"])
        bar.set_postfix(val=f"{row['val_loss']:.3f}", gap=f"{row['gap']:.2g}",
                        top=f"{top}:{row[f'weight/{top}']:.2f}")


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
