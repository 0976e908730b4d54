"""Cost of one ScaleBiO step against a gradient and an implicit-differentiation (IFT) hypergradient.

Toy: linear-regression data reweighting in d dimensions with K sources of n samples each,

    ℓ̄_k(y) = (1/2n) ‖A_k y − b_k‖² + (μ/2) ‖y‖²,     g(θ, y) = Σ_k π_k(θ) ℓ̄_k(y),
    f(y)    = (1/2m) ‖V y − c‖²,                        π = softmax(θ),

built with ``scalebio.reweighting_problem``. The validation set has m = K·n rows, as many as the
training batch (the paper draws 128 sequences of each), so f costs as much as g.

Three things are measured side by side, interleaved round-robin so load changes hit all three:

1. ``grad``:     ∇_y g(θ, y) — one forward and one backward pass; the unit of cost.
2. ``scalebio``: one ``scalebio.step`` (plain SGD): forward f(y), H(y), H(z); the three first-order
   directions; three optimizer updates.
3. ``ift``:      the implicit-function hypergradient at a given inner solution y (taken as y*, its
   computation is not timed): solve ∇²_yy g v = ∇_y f by ``--cg-iters`` conjugate-gradient steps
   with Hessian-vector products (double backward), then ∇Φ = ∇_θ f − ∇²_θy g v.

Time: median wall-clock seconds over ``--reps`` calls after one warm-up call.

Peak memory: bytes of tensor storage allocated by the call above what was live when it started,
at its highest point. Measured with ``torch.profiler`` (``profile_memory=True``): PyTorch's CPU
allocator reports every allocation and free (with its size) to the profiler; replaying those events
in time order gives the live-bytes curve, whose maximum is the peak. This counts tensors only (not
Python objects or allocator caching), which is what scales with d. Frees of tensors allocated
before the call are not reported (torch warns about this once), so the figure is an upper bound.
``tracemalloc`` does not see torch allocations and ``getrusage`` max-RSS never decreases, so
neither can isolate one call.

Run:  ``python benchmarks/toy_cost.py [--quick]``  (``--quick``: d up to 1e5).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

import scalebio as sb

DIMS = (1_000, 10_000, 100_000, 1_000_000)
QUICK_DIMS = DIMS[:3]
RIDGE = 0.1  # μ: makes g strongly convex in y (K·n rows < d), so CG has a unique solution
CHECK_DIM = 1_000
CHECK_CG_ITERS = 200  # ≥ rank(Σ π_k A_kᵀA_k)+1 = K·n+1 distinct eigenvalues: CG is exact in theory


def make_toy(d: int, k: int, n: int, dtype: torch.dtype, seed: int = 0):
    """Return (problem, θ0, y0, (A, b, V, c)) of the toy above; rows have unit expected norm."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k * n, d, generator=gen, dtype=dtype) / d**0.5
    v = torch.randn(k * n, d, generator=gen, dtype=dtype) / d**0.5
    b = torch.randn(k * n, generator=gen, dtype=dtype)
    c = torch.randn(k * n, generator=gen, dtype=dtype)

    def source_losses(y, batch):
        residual = (a @ y - b).view(k, n)
        return 0.5 * (residual**2).mean(dim=1) + 0.5 * RIDGE * (y @ y)

    def val_loss(y, batch):
        return 0.5 * ((v @ y - c) ** 2).mean()

    problem = sb.reweighting_problem(val_loss, source_losses, sb.make_simplex(k))
    y0 = torch.randn(d, generator=gen, dtype=dtype) / d**0.5
    return problem, torch.zeros(k, dtype=dtype), y0, (a, b, v, c)


def lower(problem, x, y):
    return problem.combine(x, problem.features(y, None), None)


def grad_lower(problem, x, y) -> torch.Tensor:
    """∇_y g(θ, y): the baseline unit of cost."""
    (gy,) = torch.autograd.grad(lower(problem, x, y), y)
    return gy


def conjugate_gradient(matvec: Callable, rhs: torch.Tensor, iters: int) -> torch.Tensor:
    """Solve M v = rhs for symmetric positive-definite M by ``iters`` CG steps from v = 0.

    r = rhs − M v, p the search direction; step a = rᵀr / pᵀMp, then p ← r + (r'ᵀr' / rᵀr) p.
    A fixed number of steps (no early stop) keeps the cost the same on every call.
    """
    sol = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = r @ r
    for _ in range(iters):
        if float(rr) == 0.0:  # exact solution reached
            break
        mp = matvec(p)
        step = rr / (p @ mp)
        sol = sol + step * p
        r = r - step * mp
        rr_next = r @ r
        p = r + (rr_next / rr) * p
        rr = rr_next
    return sol


def ift_hypergradient(problem, x, y, cg_iters: int) -> torch.Tensor:
    """∇Φ(θ) = ∇_θ f − ∇²_θy g [∇²_yy g]⁻¹ ∇_y f at y taken as y*(θ), with CG on the inverse."""
    x = x.detach().requires_grad_(True)
    gy = torch.autograd.grad(lower(problem, x, y), y, create_graph=True)[0]
    fx, fy = torch.autograd.grad(problem.upper(x, y, None), (x, y), allow_unused=True)

    def hvp(vec):
        return torch.autograd.grad(gy, y, vec, retain_graph=True)[0]

    v = conjugate_gradient(hvp, fy, cg_iters)
    (mixed,) = torch.autograd.grad(gy, x, v)  # ∇_θ (∇_y g · v) = ∇²_θy g v
    return (torch.zeros_like(mixed) if fx is None else fx) - mixed


def check_ift(k: int, n: int, cg_iters: int) -> tuple[float, float]:
    """Relative error of the CG hypergradient against a dense solve (float64, d = CHECK_DIM).

    Closed form: ∇Φ = −J(π) s with J(π) = diag(π) − ππᵀ and s_k = ∇ℓ̄_k(y)ᵀ H⁻¹ ∇f(y),
    H = Σ_k π_k A_kᵀA_k / n + μI. Returns (error with CHECK_CG_ITERS steps, with ``cg_iters``).
    """
    problem, x, y, (a, b, v, c) = make_toy(CHECK_DIM, k, n, torch.float64)
    y.requires_grad_(True)
    pi = torch.softmax(x, 0)
    a_k, b_k = a.view(k, n, -1), b.view(k, n)
    hess = torch.einsum("k,kni,knj->ij", pi, a_k, a_k) / n + RIDGE * torch.eye(CHECK_DIM)
    grad_f = v.T @ (v @ y.detach() - c) / (k * n)
    grad_l = torch.einsum("kni,kn->ki", a_k, a_k @ y.detach() - b_k) / n + RIDGE * y.detach()
    s = grad_l @ torch.linalg.solve(hess, grad_f)
    exact = -(torch.diag(pi) - torch.outer(pi, pi)) @ s
    errors = []
    for iters in (CHECK_CG_ITERS, cg_iters):
        got = ift_hypergradient(problem, x, y, iters)
        errors.append(float((got - exact).norm() / exact.norm()))
    return errors[0], errors[1]


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak live tensor bytes allocated by fn() above the level at its start (see docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(d: int, k: int, n: int, reps: int, cg_iters: int) -> dict[str, float]:
    problem, x0, y0, _ = make_toy(d, k, n, torch.float32)
    config = sb.ScaleBiOConfig(alpha=10.0, opt_x=sb.sgd(1e-3), opt_y=sb.sgd(1e-3),
                               opt_z=sb.sgd(1e-3))
    holder = {"state": sb.init(problem, x0, y0, config)}
    x_fixed = x0.clone().requires_grad_(True)
    y_fixed = y0.clone().requires_grad_(True)

    def scalebio_step():
        holder["state"], _ = sb.step(problem, holder["state"], config)

    calls = {
        "grad": lambda: grad_lower(problem, x_fixed, y_fixed),
        "scalebio": scalebio_step,
        "ift": lambda: ift_hypergradient(problem, x_fixed, y_fixed, cg_iters),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    row = {f"{name}_s": statistics.median(ts) for name, ts in times.items()}
    row.update({f"{name}_bytes": float(peak_bytes(fn)) for name, fn in calls.items()})
    return row


def machine_info(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"machine: {cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} using "
            f"{threads} thread(s); python {platform.python_version()}; {platform.system()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="d up to 1e5 instead of 1e6")
    p.add_argument("--sources", type=int, default=10, help="K, number of sources")
    p.add_argument("--samples", type=int, default=8, help="n, samples per source")
    p.add_argument("--reps", type=int, default=7, help="timed calls per method (median)")
    p.add_argument("--cg-iters", type=int, default=10, help="CG steps in the IFT hypergradient")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on shared box)")
    args = p.parse_args(argv)
    for name in ("sources", "samples", "reps", "cg_iters", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be ≥ 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    k, n = args.sources, args.samples
    print(machine_info(args.threads))
    print(f"toy: K={k} sources × n={n} samples, validation m={k * n} rows, float32, μ={RIDGE}; "
          f"IFT uses {args.cg_iters} CG steps; median of {args.reps} calls")
    exact_err, used_err = check_ift(k, n, args.cg_iters)
    print(f"IFT check (d={CHECK_DIM}, float64, vs dense solve): relative error "
          f"{exact_err:.1e} with {CHECK_CG_ITERS} CG steps, {used_err:.1e} with {args.cg_iters}")
    header = (f"{'d':>9} {'grad ms':>9} {'ScaleBiO ms':>11} {'IFT ms':>9} {'SB/grad':>8} "
              f"{'IFT/grad':>8} {'grad MB':>8} {'SB MB':>8} {'IFT MB':>8} {'SB/grad':>8} "
              f"{'IFT/grad':>8} {'SB B/d':>7}")
    rows = []
    for d in tqdm(QUICK_DIMS if args.quick else DIMS, desc="dimensions", leave=False):
        rows.append((d, measure(d, k, n, args.reps, args.cg_iters)))
    print(f"{'':>9} {'--- time per call (median) ---':^49} {'--- peak tensor memory ---':^51}")
    print(header)
    for d, r in rows:
        mb = {m: r[f"{m}_bytes"] / 2**20 for m in ("grad", "scalebio", "ift")}
        print(f"{d:>9.0e} {1e3 * r['grad_s']:>9.3f} {1e3 * r['scalebio_s']:>11.3f} "
              f"{1e3 * r['ift_s']:>9.3f} {r['scalebio_s'] / r['grad_s']:>8.2f} "
              f"{r['ift_s'] / r['grad_s']:>8.2f} {mb['grad']:>8.3f} {mb['scalebio']:>8.3f} "
              f"{mb['ift']:>8.3f} {r['scalebio_bytes'] / r['grad_bytes']:>8.2f} "
              f"{r['ift_bytes'] / r['grad_bytes']:>8.2f} {r['scalebio_bytes'] / d:>7.1f}")
    d_max, r_max = rows[-1]
    ratio = r_max["scalebio_s"] / r_max["grad_s"]
    per_coord = [r["scalebio_bytes"] / d for d, r in rows]
    # Small d is dominated by Python overhead (a few ms per step), so the claim is read at the
    # largest d, where the 3·2 matrix-vector products of a step dominate.
    print(f"\nclaim 'a ScaleBiO step costs ≤ 3 gradient evaluations': ratio {ratio:.2f} at "
          f"d = {d_max:.0e} -> {'holds' if ratio <= 3 else 'does NOT hold'} on this machine")
    print(f"claim 'O(d) memory': ScaleBiO peak bytes per coordinate {min(per_coord):.1f} to "
          f"{max(per_coord):.1f} over d = {rows[0][0]:.0e} .. {rows[-1][0]:.0e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
