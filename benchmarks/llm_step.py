"""Cost of a ScaleBiO step against one SFT step, on the same model and batch (a script, not a test).

Variants (equal training batch; ScaleBiO adds a validation batch of the same size):
  sft                   one model, forward + backward on the training batch, AdamW step;
  scalebio              u and w through the loop's ``bilevel_step`` (three forwards, a backward
                        after each), three optimizer steps;
  scalebio_lisa         the same with LISA, the library's default policy: ``--n-active`` blocks,
                        input embeddings frozen, an untied head trained (a tied one frozen);
  sft_lisa              SFT with the same LISA set;
  *_lisa_paper          LISA's paper policy: embeddings and head always trained;
  *_lisa_blocks         LISA with ``train_embeddings = train_head = False`` (blocks + norms only);
  *_lisa_head           LISA with the head trained, the input embeddings frozen (untied models).
The LISA blocks are fixed at ``[L/3, 2L/3, ...]``: the backward of a frozen-embeddings variant
stops at the lowest active block, and L/3 is where the lowest of two uniform draws falls on average.

Time. All variants live in ONE process and run interleaved, one step each per round, their order
rotated by one every round, so that load from other jobs hits every variant alike. Reported: the
median seconds per step, the spread over rounds ((max − min) / median), and for each variant the
median over rounds of its time divided by SFT's time *in the same round*.

All timed variants must fit in memory together (on a GPU with a large shape, time a subset with
``--variants``; the memory runs below are separate anyway).

Peak memory. Each variant in its own process, after ``--warmup`` steps (optimizer state exists):
on CUDA, ``torch.cuda.max_memory_allocated`` over one step; on CPU, the tensor bytes alive at the
start of the step (every storage the garbage collector can reach: weights, optimizer state, data)
plus the peak of the step's own allocations, replayed from the allocator's events recorded by
``torch.profiler`` (``profile_memory=True``, as benchmarks/toy_cost.py does). Tensors only: no
Python objects, no allocator caching; an upper bound (frees of older tensors go unreported).

Check. The one-graph-at-a-time ``bilevel_step`` against the single-backward step it replaced (kept
below, for this check only) on a small float64 Llama: the max abs difference of the gradients of u,
w and λ, both orders, 2 micro-batches (float64 round-off: ~1e-16).

  python benchmarks/llm_step.py                        # CPU: a ~10M Llama, batch 8 × 128
  python benchmarks/llm_step.py --shape smollm2 --rounds 3 --variants sft,scalebio_lisa,\\
      scalebio_lisa_paper,sft_lisa,sft_lisa_paper     # SmolLM2-135M shape, 4 × 256
  python benchmarks/llm_step.py --shape 8b --layers 8 --batch 4 --seq 512   # GPU: 8B-shaped
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

SHAPES = {  # Llama-family shapes; "batch"/"seq" are the defaults of each shape
    "10m": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=8192, num_hidden_layers=8, batch=8, seq=128),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, num_hidden_layers=30,
                    tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                    batch=4, seq=256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, num_hidden_layers=32, batch=4, seq=512),
}
POLICIES = {"": (None, None), "_paper": (True, True), "_blocks": (False, False),
            "_head": (False, True)}
VARIANTS = {"sft": ("sft", None), "scalebio": ("scalebio", None)}
VARIANTS.update({f"{kind}_lisa{suffix}": (kind, flags) for kind in ("sft", "scalebio")
                 for suffix, flags in POLICIES.items()})
DEFAULT_VARIANTS = "sft,scalebio,scalebio_lisa,sft_lisa,scalebio_lisa_paper"
K = 4  # sources
TARGET_TIME, TARGET_MEM = 2.0, 1.15  # ScaleBiO+LISA / SFT


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_config(args) -> dict:
    shape = {k: v for k, v in SHAPES[args.shape].items() if k not in ("batch", "seq")}
    cfg = {"model_type": "llama", **shape, "max_position_embeddings": args.seq}
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    return cfg


def build(args, name: str):
    """The variant's models, engines and data; returns (step function, parameter count)."""
    from scalebio import make_simplex
    from scalebio.llm.engines.engine import OptimizerSpec
    from scalebio.llm.engines.lisa import LisaConfig
    from scalebio.llm.engines.torch_engine import build_single_engine
    from scalebio.llm.loop.losses import per_example_loss
    from scalebio.llm.loop.step import Combine, bilevel_step
    from scalebio.llm.model import copy_model, load_model

    kind, flags = VARIANTS[name]
    device = _device()
    cfg = model_config(args)
    g = torch.Generator().manual_seed(0)  # the same data for every variant
    b, t, v = args.batch, args.seq, cfg["vocab_size"]

    def make_batch(with_sources: bool) -> dict:
        ids = torch.randint(0, v, (b, t), generator=g)
        labels = ids.clone()
        labels[:, : t // 4] = -100  # a prompt without loss, as in instruction data
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if with_sources:
            out["source_ids"] = torch.arange(b) % K
        return out

    with torch.device(device):  # build directly on the GPU (an 8B-shaped init on CPU is slow)
        model = load_model(config=cfg, dtype="bfloat16" if device.type == "cuda" else "float32",
                           gradient_checkpointing=args.gradient_checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    opt = OptimizerSpec("adamw", lr=1e-5)
    lisa = None
    if flags is not None:
        lisa = LisaConfig(n_active=args.n_active, period=10**9, train_embeddings=flags[0],
                          train_head=flags[1])
    n_layers = cfg["num_hidden_layers"]
    active = sorted({min(n_layers - 1, (i + 1) * n_layers // (args.n_active + 1))
                     for i in range(args.n_active)})
    train, val = make_batch(True), make_batch(False)
    if kind == "sft":
        eng = build_single_engine(model, opt, lisa)
        if lisa is not None:
            eng.set_active_blocks(active)

        def step():
            logits = eng.module(input_ids=train["input_ids"].to(device),
                                attention_mask=train["attention_mask"].to(device)).logits
            per_example_loss(logits, train["labels"].to(device)).mean().backward()
            eng.step(1e-5, None)

        return step, n_params
    engines = [build_single_engine(copy_model(model), opt, lisa), build_single_engine(model, opt,
                                                                                      lisa)]
    if lisa is not None:
        for e in engines:
            e.set_active_blocks(active)
    theta = torch.zeros(K, device=device, requires_grad=True)
    opt_theta = torch.optim.AdamW([theta], lr=1e-2, weight_decay=0.0)
    batch = SimpleNamespace(  # the fields of llm.data.batching.StepBatch (no `datasets` import)
        train=[train], val=[val], counts=torch.bincount(train["source_ids"], minlength=K),
        val_tokens=int((val["labels"][:, 1:] != -100).sum()),
    )
    combine = Combine(make_simplex(K))

    def step():
        bilevel_step(*engines, theta, opt_theta, batch, combine, 10.0, (1e-5, 1e-5, 1e-2), None)

    return step, n_params


# ---------------------------------------------------------------------------- time
def measure_time(args, names: list[str]) -> dict:
    steps = {name: build(args, name)[0] for name in names}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _sync()
            t0 = time.perf_counter()
            steps[name]()
            _sync()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ratios = [a / s for a, s in zip(ts, times[names[0]])]
        out[name] = {"seconds": med, "spread": (max(ts) - min(ts)) / med, "rounds": ts,
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)}
    return out


# ---------------------------------------------------------------------------- memory
def measure_memory(args, name: str) -> dict:
    from toy_cost import peak_bytes  # the sibling benchmark's profiler-based peak (one copy)

    from scalebio.llm.engines.engine import live_tensor_bytes

    step, n_params = build(args, name)
    for _ in range(max(args.warmup, 1)):  # AdamW creates its state at the first step
        step()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        step()
        _sync()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = live_tensor_bytes() + peak_bytes(step)
    return {"peak_mb": peak / 2**20, "params": n_params}


# ---------------------------------------------------------------------------- gradient check
class _Recorder:
    """Engine stand-in: keeps a copy of the grads instead of stepping."""

    def __init__(self, module):
        self.module, self.grads = module, {}

    def step(self, lr, clip):
        for n, p in self.module.named_parameters():
            if p.grad is not None:
                self.grads[n], p.grad = p.grad.clone(), None
        return 0.0


def _single_backward_step(eng_u, eng_w, theta, batch, combine, alpha, order):
    """The former step (one backward of the whole surrogate per micro-batch): reference only."""
    from scalebio import penalty_surrogate
    from scalebio.llm.loop.losses import per_example_loss, source_partial_sums, val_partial_sum
    from scalebio.llm.loop.step import _forward_losses

    def h(model, tr):
        loss = per_example_loss(*_forward_losses(model, tr, None))
        return source_partial_sums(loss, tr["source_ids"], batch.counts)

    if order == "alternating":
        for tr in batch.train:
            h_u = h(eng_u.module, tr)
            zero = torch.zeros((), dtype=h_u.dtype)
            penalty_surrogate(theta, zero, h_u.detach(), h_u, combine, alpha).surrogate.backward()
        theta.grad = None
        eng_u.step(0.0, None)
    for tr, va in zip(batch.train, batch.val):
        h_w = h(eng_w.module, tr)
        with torch.set_grad_enabled(order == "simultaneous"):
            h_u = h(eng_u.module, tr)
        f = val_partial_sum(*_forward_losses(eng_w.module, va, None), batch.val_tokens)
        penalty_surrogate(theta, f, h_w, h_u, combine, alpha).surrogate.backward()
    if order == "simultaneous":
        eng_u.step(0.0, None)
    eng_w.step(0.0, None)


def grad_check() -> float:
    """Max abs difference of the u, w, λ gradients: one-graph step vs single backward, float64."""
    from scalebio import make_simplex
    from scalebio.llm.loop.step import Combine, bilevel_step
    from scalebio.llm.model import load_model

    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 64, "max_position_embeddings": 16}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (8, 12), generator=g)
    val = torch.randint(0, 64, (4, 12), generator=g)
    src = torch.arange(8) % K
    mb = [{"input_ids": ids[p], "attention_mask": torch.ones_like(ids[p]), "labels": ids[p],
           "source_ids": src[p]} for p in torch.arange(8).chunk(2)]
    vb = [{"input_ids": val[p], "attention_mask": torch.ones_like(val[p]), "labels": val[p]}
          for p in torch.arange(4).chunk(2)]
    batch = SimpleNamespace(train=mb, val=vb, counts=torch.bincount(src, minlength=K),
                            val_tokens=4 * 11)
    combine, worst = Combine(make_simplex(K)), 0.0
    for order in ("simultaneous", "alternating"):
        grads = []
        for new in (True, False):
            u, w = (_Recorder(load_model(config=cfg, seed=s).double()) for s in (0, 1))
            theta = torch.linspace(-0.3, 0.3, K, dtype=torch.float64).requires_grad_(True)
            if new:
                opt = SimpleNamespace(param_groups=[], step=lambda: None,
                                      zero_grad=lambda **_: None)  # λ's grad stays for the check
                bilevel_step(u, w, theta, opt, batch, combine, 3.0, (0.0,) * 3, None, order)
            else:
                _single_backward_step(u, w, theta, batch, combine, 3.0, order)
            grads.append([*u.grads.values(), *w.grads.values(), theta.grad])
        worst = max([worst] + [float((a - b).abs().max()) for a, b in zip(*grads)])
    return worst


# ---------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="10m")
    p.add_argument("--layers", type=int, default=0, help="override the number of blocks")
    p.add_argument("--batch", type=int, help="sequences per batch (default: the shape's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the shape's)")
    p.add_argument("--n-active", type=int, default=2)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, first = the reference; from {', '.join(VARIANTS)}")
    p.add_argument("--rounds", "--steps", type=int, default=7,
                   help="timed rounds (one step per variant); --steps: older name")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory runs")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--memory-of", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch = args.batch or SHAPES[args.shape]["batch"]
    args.seq = args.seq or SHAPES[args.shape]["seq"]
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args, args.memory_of)))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    memory = {}
    for name in [] if args.no_memory else names:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-of", name]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{name} (memory) failed:\n{out.stderr[-3000:]}")
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
    diff = grad_check()
    timing = measure_time(args, names)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        platform.processor() or "cpu")
    n_layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    print(f"model: llama {args.shape} shape ({n_layers} blocks); batch {args.batch} × {args.seq}; "
          f"LISA {args.n_active} active blocks; {args.threads} thread(s); device: {dev}; "
          f"torch {torch.__version__}; gradient checkpointing {args.gradient_checkpointing}")
    ref = names[0]
    print(f"time: {args.rounds} interleaved rounds, order rotated; ratios are per-round vs {ref}")
    print(f"{'variant':<22} {'s/step':>8} {'spread':>7} {'time/ref':>9} {'(min..max)':>13} "
          f"{'peak MB':>9} {'mem/ref':>8}")
    for name in names:
        r = timing[name]
        mem = memory.get(name, {}).get("peak_mb", float("nan"))
        ref_mem = memory.get(ref, {}).get("peak_mb", float("nan"))
        print(f"{name:<22} {r['seconds']:>8.3f} {r['spread']:>7.0%} {r['ratio']:>9.2f} "
              f"{r['ratio_min']:>6.2f}..{r['ratio_max']:<5.2f} {mem:>9.1f} {mem / ref_mem:>8.2f}")
    if "sft" in names and "scalebio_lisa" in names:
        t = statistics.median(a / b for a, b in zip(timing["scalebio_lisa"]["rounds"],
                                                    timing["sft"]["rounds"]))
        line = f"ScaleBiO+LISA / SFT: time {t:.2f} (target ≤ {TARGET_TIME})"
        if memory:
            m = memory["scalebio_lisa"]["peak_mb"] / memory["sft"]["peak_mb"]
            line += f", peak memory {m:.2f} (target ≤ {TARGET_MEM} on CPU)"
        print(line)
    print(f"gradients identical: one-graph step vs single backward, float64, max abs diff "
          f"{diff:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "time": timing, "memory": memory, "grad_diff": diff},
                      fh, indent=1)


if __name__ == "__main__":
    main()
