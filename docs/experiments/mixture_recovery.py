"""Mixture recovery at small LLM scale (docs/results.md §3; a script, not a test).

Runs ``scalebio.llm.recovery.recovery_run`` for every (α, seed) given and writes
``recovery.json`` (one summary per run: final / averaged / tail-averaged L1 to π° at steps/4,
steps/2 and steps) and ``recovery.md`` (mean ± std over seeds). The designs are described in
``llm/tasks/recovery.py``: ``styles`` (identifiable, the default) and ``disjoint`` (not
identifiable).

    python docs/experiments/mixture_recovery.py --out runs/recovery_a1          # α = 1, seeds 0-2
    python docs/experiments/mixture_recovery.py --out runs/recovery_a10 --alphas 10 --lr-lambda 0.1
    python docs/experiments/mixture_recovery.py --out runs/recovery_disjoint --design disjoint
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from scalebio.llm import outputs
from scalebio.llm.tasks.recovery import recovery_run


def table(results: list[dict]) -> str:
    """Mean ± sample std over seeds of each L1 column, one row per (α, checkpoint step)."""
    lines = ["| α | step | L1(weights) | L1(average 1..t) | L1(average of last quarter) |",
             "|---|---|---|---|---|"]
    for alpha in sorted({r["alpha"] for r in results}):
        runs = [r for r in results if r["alpha"] == alpha]
        for i, point in enumerate(runs[0]["curve"]):
            cells = []
            for key in ("l1", "l1_averaged", "l1_tail"):
                v = np.array([r["curve"][i][key] for r in runs])
                std = f"{v.std(ddof=1):.3f}" if len(v) > 1 else "–"
                cells.append(f"{v.mean():.3f} ± {std}")
            lines.append(f"| {alpha:g} | {point['step']} | " + " | ".join(cells) + " |")
    first = results[0]
    lines += ["", f"π° = {first['target']}; L1(uniform, π°) = {first['l1_uniform']:.3f}; "
              f"seeds {sorted({r['seed'] for r in results})}; design {first['design']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--design", choices=("styles", "disjoint"), default="styles")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--geometry", choices=("softmax", "mirror"), default="softmax")
    p.add_argument("--lambda-optimizer", choices=("adamw", "sgd"), default="sgd",
                   help="default sgd (docs/results.md §3: Adam's fixed-speed step circles π°)")
    p.add_argument("--lr-lambda", type=float, default=1.0)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                   help="shape of all three learning rates (default cosine: decays to 0)")
    p.add_argument("--n-val", type=int, default=4000,
                   help="validation examples (few are memorised by w: docs/results.md §3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    outputs.prepare_out_dir(out, resume=False, overwrite=args.overwrite)
    bilevel = {"geometry": args.geometry, "lambda_optimizer": args.lambda_optimizer,
               "lr_lambda": args.lr_lambda, "schedule": args.schedule}
    results = []
    for alpha in args.alphas:
        for seed in args.seeds:
            r = recovery_run(out / f"alpha{alpha:g}_seed{seed}", args.design, args.steps, seed,
                             bilevel={**bilevel, "alpha": alpha}, n_val=args.n_val,
                             threads=args.threads, progress=False)
            results.append(r)
            print(f"α {alpha:g} seed {seed}: " + "  ".join(
                f"t={c['step']}: {c['l1']:.3f}/{c['l1_averaged']:.3f}/{c['l1_tail']:.3f}"
                for c in r["curve"]) + "   final " + ", ".join(
                f"{n} {w:.3f}" for n, w in r["weights"].items()), flush=True)
    outputs.atomic_write_text(out / "recovery.json", json.dumps(results, indent=2) + "\n")
    outputs.atomic_write_text(out / "recovery.md", table(results))
    print(table(results))


if __name__ == "__main__":
    main()
