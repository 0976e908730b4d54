"""``run_baseline``: one method end to end, writing ``out/weights.json`` (and ``selected.json``
for LESS with ``top_p``) in the format of ``scalebio reweight``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scalebio.llm import outputs
from scalebio.llm.baselines import common, doremi, less, rho, static
from scalebio.llm.baselines.args import BASELINE_METHODS, BaselineArgs
from scalebio.llm.config import Config, ConfigError
from scalebio.llm.loop.setup import build_sampler, load_data, load_run_model, start_run

METHODS = BASELINE_METHODS
MAX_PROJECTION_ENTRIES = 2**28  # LESS's projection factors: 1 GiB of float32 at most


def run_baseline(cfg: Config, method: str, args: BaselineArgs, out: Path,
                 overwrite: bool = False, progress: bool = True,
                 raw_config: dict | None = None) -> dict:
    """Compute one baseline's mixture weights and write them to ``out/weights.json``.

    Args:
      cfg: the run configuration of ``scalebio reweight`` (sources, validation, model, run.seed).
      method: one of :data:`METHODS`.
      args: method hyperparameters.
      out: output folder (refused if non-empty unless ``overwrite``).

    Returns:
      The weights.json document (``weights``, ``averaged_weights``, ``names``, ``method``, ...).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    _, _, device = start_run(cfg, out, overwrite=overwrite)
    extra: dict = {"config": raw_config}
    if method == "uniform":
        names = [s.name for s in cfg.data.source_specs()]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: duplicate source names in {names}")
        w = static.uniform_weights(len(names))
        return common.write_result(out, names, w, w, method, extra)
    tokenizer, data = load_data(cfg, out)
    names, pad = data.names, tokenizer.pad_token_id
    extra["dropped_examples"] = dict(data.dropped)
    if method == "size":
        sizes = [len(d) for d in data.train]
        w = static.size_weights(sizes)
        extra["examples"] = dict(zip(names, sizes))
        return common.write_result(out, names, w, w, method, extra)

    steps = args.steps or cfg.bilevel.steps
    lr = args.lr or cfg.bilevel.lr_u
    sampler = build_sampler(cfg, data, pad)
    k = len(names)
    uniform = static.uniform_weights(k)
    extra.update(steps=steps, lr=lr)
    trained = load_run_model(cfg, device)  # the uniform-mixture model: DoReMi's reference
    head = trained.get_output_embeddings().weight
    if method == "less" and sum(head.shape) * args.proj_dim > MAX_PROJECTION_ENTRIES:
        raise ConfigError(f"baseline --proj-dim: projection factors for a {tuple(head.shape)} "
                          f"head and d = {args.proj_dim} could exceed {MAX_PROJECTION_ENTRIES} "
                          "entries; lower --proj-dim")
    common.train_weighted(common.Trainer(cfg, trained, lr), sampler, steps, device,
                          lambda batch, h: uniform, "uniform mixture", progress)

    if method == "doremi":
        trained.eval()
        proxy = load_run_model(cfg, device)
        state = {"alpha": uniform.clone()}
        excess = []

        def mixture(batch, h: torch.Tensor) -> torch.Tensor:
            lam = doremi.batch_excess(proxy, trained, batch, device)
            state["alpha"] = doremi.doremi_update(state["alpha"], lam, args.eta, args.smoothing)
            excess.append(lam.tolist())
            return state["alpha"]

        used = common.train_weighted(common.Trainer(cfg, proxy, lr), sampler, steps,
                                     device, mixture, "DoReMi proxy", progress)
        averaged = torch.stack(used).mean(0)
        extra.update(eta=args.eta, smoothing=args.smoothing,
                     trajectory={"weights": [u.tolist() for u in used], "excess": excess})
        return common.write_result(out, names, used[-1], averaged, method, extra)

    n, bs = args.max_examples, args.eval_batch
    if method == "rho":
        reference = load_run_model(cfg, device)
        common.train_on_validation(common.Trainer(cfg, reference, lr), sampler,
                                   steps, device, progress)
        trained.eval()
        reference.eval()
        tl = [common.example_losses(trained, d, n, bs, pad, device) for d in data.train]
        rl = [common.example_losses(reference, d, n, bs, pad, device) for d in data.train]
        w, r = rho.rho_weights(tl, rl, args.rule, args.temperature)
        extra.update(rule=args.rule, temperature=args.temperature,
                     reducible_loss=dict(zip(names, r.tolist())))
        return common.write_result(out, names, w, w, method, extra)

    # LESS-style
    trained.eval()
    gen = torch.Generator().manual_seed(cfg.run.seed)
    proj = less.kronecker_projection(head.shape[0], head.shape[1], args.proj_dim, gen)
    g_val = less.mean_gradient(trained, common.example_batches(data.val, n, bs, pad), device, proj)
    scores = [less.cosine_scores(
        less.head_gradients(trained, common.example_batches(d, n, bs, pad), device, proj), g_val)
        for d in data.train]
    s = less.source_scores(scores)
    w = common.scores_to_weights(s, args.rule, args.temperature)
    extra.update(rule=args.rule, temperature=args.temperature, proj_dim=args.proj_dim,
                 scores=dict(zip(names, s.tolist())))
    if args.top_p is not None:
        kept = dict(zip(names, less.top_p_ids(scores, args.top_p)))
        per_example = {n: sc.tolist() for n, sc in zip(names, scores)}
        sel = {"top_p": args.top_p, "ids": kept, "scores": per_example}
        outputs.atomic_write_text(out / "selected.json", json.dumps(sel, indent=2) + "\n")
        extra["selected"] = "selected.json"
    return common.write_result(out, names, w, w, method, extra)
