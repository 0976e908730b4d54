"""``scalebio compare``: ScaleBiO against the baselines, end to end, over several seeds.

For every (method, seed) on one multi-source task: mixture weights (``scalebio`` = ``reweight``,
the others = ``run_baseline``) → a mixture of N rows (``mix``, time-averaged weights) → a fresh
model fine-tuned on it (``sft``, same config and seed for every method) → ``evaluate`` (token-mean
loss on the target validation data, greedy-answer accuracy where answers are numeric, and each
source's loss on the records its mixture did not draw).
Outputs under ``out``: ``runs/<method>/seed<k>/{weights,mix,sft,eval}``, ``compare.json``,
``compare.md`` and ``compare.png``. The task is the demo's (``write_demo_sources`` into
``out/data``, one fixed data seed: seeds vary training, not the task) or any source config.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scalebio.llm import outputs
from scalebio.llm.baselines.args import BASELINE_METHODS
from scalebio.llm.config_files import config_from_dict, load_config
from scalebio.llm.tasks.demo import demo_config
from scalebio.llm.tasks.demo_data import write_demo_sources

METHODS = ("scalebio", *BASELINE_METHODS)
STAGES = ("weights", "mix", "sft", "eval")
DATA_SEED = 0  # the demo task is fixed across seeds; only training and mixing draws vary
STD_RULE = "sample standard deviation over seeds (divisor n - 1); null with one seed"


class CompareError(RuntimeError):
    """A stage of one (method, seed) run failed; the message names all three."""


@dataclass(frozen=True)
class CompareSettings:
    """Sizes of one comparison. ``model`` overrides ``model.config`` keys (from-scratch models).

    weight_steps: steps of reweight and of every model a baseline trains. sft_steps/sft_lr/
    sft_batch: the fine-tuning run (None = the config's lr_w / global_batch). num_examples: N of
    the mixture. eval_examples: examples per evaluated set. baseline_examples: examples RHO/LESS
    score per source. when_short: mix's rule for a source with fewer records than its count
    (``upsample`` or ``cap``). n_train/n_val/per_source/threads: the demo task only.
    """

    weight_steps: int = 200
    sft_steps: int = 200
    sft_lr: float | None = None
    sft_batch: int | None = None
    num_examples: int = 2000
    eval_examples: int = 200
    baseline_examples: int = 256
    when_short: str = "upsample"
    n_train: int = 1000
    n_val: int = 200
    per_source: int = 16
    threads: int = 2
    model: dict | None = None


# A few minutes on 2 CPU cores for 6 methods x 3 seeds (hidden 32, 2 layers, 40 + 300 steps).
QUICK = CompareSettings(
    weight_steps=40, sft_steps=300, sft_lr=3e-3, sft_batch=16, num_examples=320, eval_examples=32,
    baseline_examples=32, n_train=160, n_val=48, per_source=4, threads=1,
    model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2},
)


def parse_methods(text: str) -> tuple[str, ...]:
    """``"scalebio,uniform"`` -> ``("scalebio", "uniform")``; unknown or repeated names raise."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"--methods: expected distinct names among {METHODS}, got {text!r}")
    return names


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; non-integers, negatives or repeats raise."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def mean_std(values: list[float]) -> dict:
    """``{"mean": x̄, "std": s}`` with s² = Σ(xᵢ − x̄)² / (n − 1); std is None when n = 1."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std}


def eval_metrics(doc: dict) -> dict:
    """Target metrics from ``evaluate``'s results: loss on all validation data, accuracy pooled
    over the validation sets (correct / checkable; None when no answer is checkable)."""
    val = [s for s in doc["sets"] if s["role"] == "validation"]
    checkable = sum(s["checkable"] or 0 for s in val)
    correct = sum(s["correct"] or 0 for s in val)
    total = next(s for s in doc["sets"] if s["role"] == "validation_all")
    return {"val_loss": total["loss"], "accuracy": correct / checkable if checkable else None,
            "correct": correct, "checkable": checkable,
            "source_losses": {s["name"]: s["loss"] for s in doc["sets"] if s["role"] == "source"}}


def summarize_method(runs: list[dict]) -> dict:
    """Mean ± std over seeds of val_loss and accuracy (None if any seed lacks it), mean weights."""
    accs = [r["accuracy"] for r in runs]
    names = list(runs[0]["weights"])
    return {
        "val_loss": mean_std([r["val_loss"] for r in runs]),
        "accuracy": mean_std(accs) if None not in accs else mean_std([]),
        "weights_mean": {n: math.fsum(r["weights"][n] for r in runs) / len(runs) for n in names},
    }


def _task(out: Path, config_path: str | Path | None, s: CompareSettings) -> dict:
    """The base raw config (absolute source paths, shared token cache)."""
    if config_path is None:
        data = write_demo_sources(out / "data", seed=DATA_SEED, n_train_per_source=s.n_train,
                                  n_val=s.n_val)
        raw = demo_config(data, s.weight_steps, DATA_SEED, s.per_source, s.threads)
        raw["run"]["tracker"] = "none"
    else:
        _, raw = load_config(config_path)
    raw.setdefault("data", {}).setdefault("cache_dir", str(out / "cache"))
    if s.model is not None and isinstance(raw.get("model", {}).get("config"), dict):
        raw["model"]["config"].update(s.model)
    return raw


def _stage_raw(base: dict, seed: int, s: CompareSettings, stage: str) -> dict:
    raw = copy.deepcopy(base)
    raw.setdefault("run", {})["seed"] = seed
    b = raw.setdefault("bilevel", {})
    if stage == "sft":
        b["steps"] = s.sft_steps
        if s.sft_lr is not None:
            b["lr_w"] = s.sft_lr
        if s.sft_batch is not None:
            raw["data"]["global_batch"] = s.sft_batch
    else:
        b["steps"] = s.weight_steps
    return raw


def _check_mixture_size(base: dict, config_file: Path, s: CompareSettings) -> None:
    """Refuse, before any training, what ``mix`` would refuse after every weights stage."""
    from scalebio.llm.pipeline.mix import WHEN_SHORT, count_records, sources_from_config

    if s.when_short not in WHEN_SHORT:
        raise ValueError(f"--when-short: expected one of {WHEN_SHORT}, got {s.when_short!r}")
    if s.when_short == "cap":
        total = sum(count_records(spec) for spec in
                    sources_from_config(base, str(config_file), config_file.parent))
        if s.num_examples > total:
            raise ValueError(f"--num-examples {s.num_examples}: the sources hold only {total} "
                             "records, and --when-short cap takes each at most once; use "
                             "--when-short upsample or a smaller N")


def run_one(base: dict, config_file: Path, method: str, seed: int, run_dir: Path,
            s: CompareSettings) -> dict:
    """Weights → mix → sft → eval for one (method, seed); returns its metrics and weights."""
    from scalebio.llm.baselines import BaselineArgs, run_baseline
    from scalebio.llm.loop.reweight import reweight
    from scalebio.llm.pipeline.evaluate import evaluate
    from scalebio.llm.pipeline.mix import mix
    from scalebio.llm.pipeline.sft import sft

    t0, stage, seconds = time.perf_counter(), STAGES[0], {}
    try:
        raw = _stage_raw(base, seed, s, "weights")
        cfg = config_from_dict(raw, f"compare {method} seed {seed}")
        if method == "scalebio":
            reweight(cfg, run_dir / "weights", progress=False, raw_config=raw)
        else:
            args = BaselineArgs(max_examples=s.baseline_examples)
            run_baseline(cfg, method, args, run_dir / "weights", progress=False, raw_config=raw)
        seconds[stage], stage = time.perf_counter() - t0, "mix"
        manifest = mix(run_dir / "weights" / "weights.json", run_dir / "mix", s.num_examples,
                       config_path=config_file, seed=seed, averaged=True,
                       when_short=s.when_short, progress=False)
        seconds[stage], stage = time.perf_counter() - t0 - sum(seconds.values()), "sft"
        raw = _stage_raw(base, seed, s, "sft")
        cfg = config_from_dict(raw, f"compare {method} seed {seed} sft")
        sft(cfg, run_dir / "mix", run_dir / "sft", progress=False)
        seconds[stage], stage = time.perf_counter() - t0 - sum(seconds.values()), "eval"
        doc = evaluate(run_dir / "sft" / "model", cfg, run_dir / "eval",
                       max_examples=s.eval_examples, max_new_tokens=8, seed=seed,
                       held_out=run_dir / "mix", progress=False)
        seconds[stage] = time.perf_counter() - t0 - sum(seconds.values())
    except Exception as e:
        raise CompareError(f"method {method!r}, seed {seed}, stage {stage!r} failed: "
                           f"{type(e).__name__}: {e}") from e
    return {"seed": seed, **eval_metrics(doc), "weights": manifest["weights"],
            "seconds": time.perf_counter() - t0, "stage_seconds": seconds}


def compare(out: Path, *, config_path: str | Path | None = None,
            methods: tuple[str, ...] = METHODS, seeds: tuple[int, ...] = (0, 1, 2),
            quick: bool = False, overwrite: bool = False, progress: bool = True,
            settings: CompareSettings | None = None) -> dict:
    """Run every (method, seed), write compare.json/.md/.png under ``out``; returns the summary.

    Args:
      out: output folder; an existing non-empty one is refused unless ``overwrite``.
      config_path: a reweight config whose sources/validation define the task (default: the
        demo's sources, written into ``out/data``).
      methods: names among :data:`METHODS`. seeds: one full pipeline per method and seed.
      quick: the tiny :data:`QUICK` sizes when ``settings`` is None (recorded in compare.json).
      settings: explicit sizes (the CLI's ``--num-examples``/``--when-short`` start from the
        quick or default sizes and replace those fields).

    Raises:
      ValueError: an unknown method or a bad seed. CompareError: a stage failed (names it).
    """
    methods = parse_methods(",".join(methods))
    seeds = parse_seeds(",".join(str(k) for k in seeds))
    s = settings or (QUICK if quick else CompareSettings())
    out = Path(out).resolve()
    outputs.refuse_deleting_inputs(out, overwrite, [] if config_path is None else [config_path])
    outputs.prepare_out_dir(out, resume=False, overwrite=overwrite)
    t0 = time.perf_counter()
    base = _task(out, config_path, s)
    config_file = out / "config.json"
    outputs.atomic_write_text(config_file, json.dumps(base, indent=2) + "\n")
    _check_mixture_size(base, config_file, s)

    from tqdm.auto import tqdm

    pairs = [(m, k) for m in methods for k in seeds]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for m, k in (bar := tqdm(pairs, desc="scalebio compare", disable=not progress)):
        bar.set_postfix(method=m, seed=k)
        runs[m].append(run_one(base, config_file, m, k, out / "runs" / m / f"seed{k}", s))
    doc = {"methods": list(methods), "seeds": list(seeds), "quick": quick,
           "settings": asdict(s), "std": STD_RULE, "weights": "time-averaged (mix --averaged)",
           "results": {m: {"runs": runs[m], **summarize_method(runs[m])} for m in methods},
           "seconds": time.perf_counter() - t0}
    outputs.atomic_write_text(out / "compare.json", json.dumps(doc, indent=2) + "\n")
    outputs.atomic_write_text(out / "compare.md", format_markdown(doc))
    plot_compare(doc, out / "compare.png")
    return doc


def _pm(stat: dict, digits: int = 4) -> str:
    if stat["mean"] is None:
        return "–"
    std = "–" if stat["std"] is None else f"{stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {std}"


def format_markdown(doc: dict) -> str:
    """A markdown table: method, val loss mean ± std, accuracy mean ± std, mean weights."""
    names = list(doc["results"][doc["methods"][0]]["weights_mean"])
    head = ["method", "target val loss", "accuracy"] + [f"w({n})" for n in names]
    lines = [f"Seeds {doc['seeds']}; mean ± {doc['std']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in doc["methods"]:
        r = doc["results"][m]
        cells = [m, _pm(r["val_loss"]), _pm(r["accuracy"], 3)]
        cells += [f"{r['weights_mean'][n]:.3f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(doc: dict, path: Path) -> None:
    """Bars of mean target validation loss and accuracy per method, error bars ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, ("val_loss", "accuracy"), ("target val loss", "accuracy")):
        stats = [doc["results"][m][key] for m in doc["methods"]]
        means = [math.nan if st["mean"] is None else st["mean"] for st in stats]
        errs = [0.0 if st["std"] is None else st["std"] for st in stats]
        ax.bar(doc["methods"], means, yerr=errs, capsize=4, color="tab:blue")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: mean ± std over {len(doc['seeds'])} seeds")
        ax.tick_params(axis="x", rotation=30)
    outputs._save_figure(fig, path)
    plt.close(fig)
