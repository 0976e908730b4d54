"""Mixture recovery at small LLM scale (docs/results.md §3; a script, not a test).

Training sources are the demo's (clean addition, 25/50/75/100 % corrupted copies, prose, code).
The validation set is drawn as a *known* mixture of two of them: π°(clean) = 0.6, π°(prose) = 0.4,
fresh examples from each distribution. In the well-specified bilevel problem π° is a minimiser
(theory/README.md); here the model is a small Llama trained from scratch for a few hundred steps,
so we measure how close the learned weights come: L1 distance of the time-averaged and final
weights to π°, for each α given.

    python docs/experiments/mixture_recovery.py --out runs/recovery --alphas 1 10 --steps 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from scalebio.llm import outputs
from scalebio.llm.config import config_from_dict
from scalebio.llm.demo import demo_config
from scalebio.llm.demo_data import addition_examples, prose_pool, write_demo_sources
from scalebio.llm.train import reweight

TARGET = {"clean": 0.6, "prose": 0.4}


def write_mixture_validation(path: Path, n: int, seed: int) -> dict:
    """n validation examples: round(0.6 n) fresh clean additions, the rest prose (own streams)."""
    rng = np.random.default_rng([seed, 7001])
    n_clean = round(TARGET["clean"] * n)
    pool = prose_pool()
    prose = [pool[int(i)] for i in rng.choice(len(pool), size=n - n_clean, replace=False)]
    records = addition_examples(rng, n_clean) + prose
    order = rng.permutation(len(records))
    path.write_text("".join(json.dumps(records[int(i)]) + "\n" for i in order))
    return {"name": "val_mixture", "path": str(path), "format": "alpaca"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    outputs.prepare_out_dir(out, resume=False, overwrite=args.overwrite)
    data = write_demo_sources(out / "data", seed=args.seed)
    data["val"] = write_mixture_validation(out / "data" / "val_mixture.jsonl", 200, args.seed)
    results = []
    for alpha in args.alphas:
        raw = demo_config(data, args.steps, args.seed)
        raw["bilevel"]["alpha"] = alpha
        raw["data"]["cache_dir"] = str(out / "cache")
        raw["run"]["tracker"] = "none"
        doc = reweight(config_from_dict(raw, "recovery"), out / f"alpha{alpha:g}", raw_config=raw)
        target = {n: TARGET.get(n, 0.0) for n in doc["names"]}
        row = {"alpha": alpha, "steps": args.steps}
        for key in ("weights", "averaged_weights"):
            row[f"l1_{key}"] = sum(abs(doc[key][n] - target[n]) for n in doc["names"])
            row[key] = doc[key]
        # L1 after half the steps, from the trajectory, to show the trend
        half = doc["rows"][len(doc["rows"]) // 2 - 1]
        row["l1_weights_half"] = sum(abs(half[f"weight/{n}"] - target[n]) for n in doc["names"])
        results.append(row)
        print(f"alpha {alpha:g}: L1(final) {row['l1_weights']:.3f}  L1(averaged) "
              f"{row['l1_averaged_weights']:.3f}  L1(step {args.steps // 2}) "
              f"{row['l1_weights_half']:.3f}")
        print("  final: " + ", ".join(f"{n} {w:.3f}" for n, w in doc["weights"].items()))
    outputs.atomic_write_text(out / "recovery.json", json.dumps(
        {"target": TARGET, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
