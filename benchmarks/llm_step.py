"""Cost of a ScaleBiO step against one SFT step, on the same model and batch (a script, not a test).

Variants, each run in its own process so that peak memory is its own:
  (a) sft       — one model, forward + backward on the training batch, AdamW step (all params);
  (b) scalebio  — u and w, the LLM loop's `bilevel_step`: u and w on the training batch, w on a
                  validation batch of the same size, one backward, three optimizer steps;
  (c) lisa      — (b) with LISA: n_active blocks + embeddings/head trainable, optimizer state
                  only for those (the engine frees the rest).
Prints time per step (median over the timed steps) and peak memory, and the ratios b/a and c/a.
The floor for b/a is ~3 (three forward+backward passes); targets: c/a ≤ 2.2 in time, ≤ 1.3 in
peak memory.

Peak memory: on CUDA, torch.cuda.max_memory_allocated (the allocator's high-water mark). On CPU,
the process's peak RSS minus its RSS before the models were built (ru_maxrss), so Python and
library overhead cancel; it includes allocator caching, so it is an upper bound.

  python benchmarks/llm_step.py                 # CPU: a ~10M Llama, batch 8 × 128
  python benchmarks/llm_step.py --shape 8b --layers 8 --batch 4 --seq 512   # GPU: 8B-shaped
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

SHAPES = {
    "10m": dict(
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=8192,
        num_hidden_layers=8,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        num_hidden_layers=32,
    ),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args) -> dict:
    from scalebio import make_simplex
    from scalebio.llm.engines.engine import OptimizerSpec
    from scalebio.llm.engines.lisa import LisaConfig
    from scalebio.llm.engines.torch_ddp import build_single_engine
    from scalebio.llm.loop.losses import per_example_loss
    from scalebio.llm.loop.step import Combine, bilevel_step
    from scalebio.llm.model import copy_model, load_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cfg = {"model_type": "llama", **SHAPES[args.shape], "max_position_embeddings": args.seq}
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    k, b, t, v = 4, args.batch, args.seq, cfg["vocab_size"]

    def make_batch(with_sources: bool):
        ids = torch.randint(0, v, (b, t), generator=g)
        labels = ids.clone()
        labels[:, : t // 4] = -100  # a prompt without loss, as in instruction data
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if with_sources:
            out["source_ids"] = torch.arange(b) % k
        return out

    base_rss = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dtype = "bfloat16" if cuda else "float32"
    with torch.device(device):  # build directly on the GPU (an 8B-shaped init on CPU is slow)
        model = load_model(config=cfg, dtype=dtype)
    opt = OptimizerSpec("adamw", lr=1e-5)
    lisa = LisaConfig(n_active=args.n_active, period=10**9) if args.variant == "lisa" else None
    train, val = make_batch(True), make_batch(False)
    if args.variant == "sft":
        eng = build_single_engine(model, opt, None)

        def step():
            loss = per_example_loss(
                eng.module(
                    input_ids=train["input_ids"].to(device),
                    attention_mask=train["attention_mask"].to(device),
                ).logits,
                train["labels"].to(device),
            ).mean()
            loss.backward()
            eng.step(1e-5, None)
    else:
        eng_u = build_single_engine(copy_model(model), opt, lisa)
        eng_w = build_single_engine(model, opt, lisa)
        if lisa is not None:
            eng_u.set_active_blocks(list(range(args.n_active)))
            eng_w.set_active_blocks(list(range(args.n_active)))
        theta = torch.zeros(k, device=device, requires_grad=True)
        opt_theta = torch.optim.AdamW([theta], lr=1e-2, weight_decay=0.0)
        batch = SimpleNamespace(  # the fields of llm.batching.StepBatch (no `datasets` import)
            train=[train],
            val=[val],
            counts=torch.bincount(train["source_ids"], minlength=k),
            val_tokens=int((val["labels"][:, 1:] != -100).sum()),
        )
        combine = Combine(make_simplex(k))

        def step():
            bilevel_step(
                eng_u, eng_w, theta, opt_theta, batch, combine, 10.0, (1e-5, 1e-5, 1e-2), None
            )

    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb() - base_rss
    return {
        "variant": args.variant,
        "seconds": statistics.median(times),
        "peak_mb": peak,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="10m")
    p.add_argument("--layers", type=int, default=0, help="override the number of blocks")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--n-active", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=("sft", "scalebio", "lisa"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("sft", "scalebio", "lisa"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    a = results["sft"]
    print(
        f"model: llama {args.shape} shape, {a['params'] / 1e6:.1f} M params; batch {args.batch} × "
        f"{args.seq}; LISA {args.n_active} active blocks; device: {a['device']}; "
        f"torch {torch.__version__}"
    )
    print(f"{'variant':<10} {'s/step':>9} {'peak MB':>10} {'time/sft':>9} {'mem/sft':>8}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['seconds']:>9.3f} {r['peak_mb']:>10.1f} "
            f"{r['seconds'] / a['seconds']:>9.2f} {r['peak_mb'] / max(a['peak_mb'], 1e-9):>8.2f}"
        )


if __name__ == "__main__":
    main()
