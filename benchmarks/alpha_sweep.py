"""α sweep of the two-timescale options on the recovery task and the demo (docs/results.md).

For every (task, setting, α, seed) one ``reweight`` run is made in its own process with one thread
(``OMP_NUM_THREADS=1`` and ``run.threads: 1``), at most ``--jobs`` at a time; each writes
``OUT/<task>/<setting>/alpha<α>_seed<s>/result.json``. Runs whose result.json exists are skipped,
so the sweep can be extended or resumed; ``table`` prints the tables from those files only.

Tasks (their other settings are the ones of docs/results.md):

* ``recovery``: the identifiable ``styles`` mixture (llm/tasks/recovery.py), λ by SGD with step
  1.0 and a cosine schedule, 4000 validation examples. Target: L1(final weights, π°) ≤ 0.15 and
  no collapse (no weight ≥ 0.9; the largest of π° is 0.5).
* ``demo``: ``scalebio demo``'s task and settings (llm/tasks/demo.py: AdamW on λ with step 5e-2,
  constant schedule). Target: Spearman ρ(corruption rate, weight averaged over the second half)
  ≤ −0.9 over the corrupted copies, a fraction of negative gaps g(λ, w) − g(λ, u) < 0 below 0.2
  over the second half (the run diagnostics in weights.json), and no collapse (no source other
  than ``clean`` ends with ≥ 0.5).

Settings (``SETTINGS``): K = ``bilevel.inner_steps_u``; warm-up = ``bilevel.lambda_warmup_steps``
as a fraction of the steps; "λ step / α" divides the task's λ learning rate by α (the 1/α rule of
the penalty method, which ``geometric_alpha`` applies when α grows during a run).

    python benchmarks/alpha_sweep.py run --out runs/alpha_sweep --tasks recovery demo \\
        --settings k1 k2_warm_inv --alphas 1 10 100 --seeds 0 1 2 --jobs 2
    python benchmarks/alpha_sweep.py table --out runs/alpha_sweep
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

# name → (K, λ warm-up as a fraction of the steps, divide the λ step by α)
SETTINGS = {
    "k1": (1, 0.0, False),
    "k1_inv": (1, 0.0, True),
    "k2_warm": (2, 0.1, False),
    "k2_warm_inv": (2, 0.1, True),
    "k4_warm_inv": (4, 0.1, True),
}
TASKS = ("recovery", "demo")
DEFAULT_STEPS = {"recovery": 400, "demo": 200}
RECOVERY_BILEVEL = {"lambda_optimizer": "sgd", "lr_lambda": 1.0, "schedule": "cosine"}
RECOVERY_N_VAL = 4000  # few validation examples get memorised by w (docs/results.md §3)
L1_MAX = 0.15
RECOVERY_COLLAPSE = 0.9
SPEARMAN_MAX = -0.9
NEG_GAP_MAX = 0.2
DEMO_COLLAPSE = 0.5


def bilevel_for(task: str, setting: str, alpha: float, steps: int) -> dict:
    """The ``bilevel`` keys this run replaces in the task's config."""
    from scalebio.llm.tasks.demo import DEMO_BILEVEL

    k, warm, inverse = SETTINGS[setting]
    base = RECOVERY_BILEVEL if task == "recovery" else DEMO_BILEVEL
    lr = base["lr_lambda"] / alpha if inverse else base["lr_lambda"]
    return {**base, "alpha": alpha, "lr_lambda": lr, "inner_steps_u": k,
            "lambda_warmup_steps": round(warm * steps)}


def _half_average(run_dir: Path, names: list[str]) -> dict[str, float]:
    """π averaged over the second half of the steps (trajectory.csv), as the diagnostics read."""
    with open(run_dir / "trajectory.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = rows[len(rows) // 2 :]
    return {n: float(np.mean([float(r[f"weight/{n}"]) for r in rows])) for n in names}


def _run_recovery(out: Path, bilevel: dict, steps: int, seed: int) -> dict:
    from scalebio.llm.tasks.recovery import l1, recovery_run

    s = recovery_run(out, "styles", steps, seed, bilevel=bilevel, n_val=RECOVERY_N_VAL,
                     threads=1, progress=False)
    doc = json.loads((out / "run" / "weights.json").read_text())
    half = _half_average(out / "run", doc["names"])
    return {"weights": s["weights"], "half_weights": half, "target": s["target"],
            "l1": s["l1"], "l1_half": l1(half, s["target"]),
            "negative_gap_fraction": doc["diagnostics"]["negative_gap_fraction"],
            "collapse": max(s["weights"].values()) >= RECOVERY_COLLAPSE}


def _run_demo(out: Path, bilevel: dict, steps: int, seed: int) -> dict:
    from scalebio.llm.config_files import config_from_dict
    from scalebio.llm.loop.reweight import reweight
    from scalebio.llm.tasks.demo import demo_config
    from scalebio.llm.tasks.demo_data import write_demo_sources

    data = write_demo_sources(out / "data", seed=seed, n_train_per_source=1000, n_val=200)
    raw = demo_config(data, steps, seed, threads=1)
    raw["bilevel"].update(bilevel)
    raw["data"]["cache_dir"] = str(out / "cache")
    raw["run"]["tracker"] = "none"
    doc = reweight(config_from_dict(raw, "alpha sweep demo"), out / "run", progress=False,
                   raw_config=raw)
    rates = data["corruption_rates"]
    half = _half_average(out / "run", doc["names"])
    return {"weights": doc["weights"], "half_weights": half,
            "averaged_weights": doc["averaged_weights"], "rates": rates,
            "spearman_half": spearman(half, rates),
            "spearman_averaged": spearman(doc["averaged_weights"], rates),
            "negative_gap_fraction": doc["diagnostics"]["negative_gap_fraction"],
            "collapse": any(w >= DEMO_COLLAPSE for n, w in doc["weights"].items() if n != "clean")}


def spearman(weights: dict[str, float], rates: dict[str, float]) -> float:
    """ρ(corruption rate, weight) over the corrupted copies only, as ``scalebio demo`` reports
    it (4 copies: ≤ −0.9 means the exact order)."""
    corrupted = [n for n, r in rates.items() if r > 0]
    rho = spearmanr([rates[n] for n in corrupted], [weights[n] for n in corrupted]).statistic
    return float(rho)


def job(task: str, setting: str, alpha: float, seed: int, steps: int, out: Path) -> None:
    """One run; writes out/result.json (with ``error`` set when the run stopped)."""
    bilevel = bilevel_for(task, setting, alpha, steps)
    start = time.perf_counter()
    result = {"task": task, "setting": setting, "alpha": alpha, "seed": seed, "steps": steps,
              "bilevel": bilevel}
    if (out / "work").exists():  # a run that was interrupted before writing its result
        shutil.rmtree(out / "work")
    try:
        run = _run_recovery if task == "recovery" else _run_demo
        result |= run(out / "work", bilevel, steps, seed) | {"error": None}
    except Exception as e:  # a diverged run is a result of the sweep, not a crash of it
        result |= {"error": f"{type(e).__name__}: {e}", "collapse": True}
    result["seconds"] = time.perf_counter() - start
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def met(r: dict) -> bool:
    """Did this run meet its task's target?"""
    if r["error"] or r["collapse"]:
        return False
    if r["task"] == "recovery":
        return r["l1"] <= L1_MAX
    return r["spearman_half"] <= SPEARMAN_MAX and r["negative_gap_fraction"] < NEG_GAP_MAX


def _job_dir(out: Path, task: str, setting: str, alpha: float, seed: int) -> Path:
    return out / task / setting / f"alpha{alpha:g}_seed{seed}"


def run_sweep(args) -> None:
    pending, seen = [], set()
    for p in args.out.glob("*/*/*/result.json"):  # finished runs, under any setting name
        r = json.loads(p.read_text())
        seen.add((r["task"], json.dumps(r["bilevel"], sort_keys=True), r["seed"], r["steps"]))
    grid = [(task, setting, alpha, seed) for task in args.tasks for setting in args.settings
            for alpha in args.alphas for seed in args.seeds
            if f"{task}/{setting}" not in args.exclude]
    if args.runs:  # an explicit list, run in the order given
        grid = [(t, s, float(a), int(n)) for t, s, a, n in (r.split("/") for r in args.runs)]
    for task, setting, alpha, seed in grid:
        steps = args.steps[task]
        # at α = 1 a "/α" setting is its plain twin: run it once
        key = (task, json.dumps(bilevel_for(task, setting, alpha, steps), sort_keys=True), seed,
               steps)
        if key not in seen:
            seen.add(key)
            pending.append((task, setting, alpha, seed, steps,
                            _job_dir(args.out, task, setting, alpha, seed)))
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, tuple]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            task, setting, alpha, seed, steps, d = spec = pending.pop(0)
            d.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "job", "--task", task, "--setting", setting,
                   "--alpha", str(alpha), "--seed", str(seed), "--steps", str(steps),
                   "--out", str(d)]
            log = open(d / "log.txt", "w")  # noqa: SIM115 (closed when the job ends)
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), spec))
        time.sleep(2)
        for proc, spec in [p for p in running if p[0].poll() is not None]:
            running.remove((proc, spec))
            result = spec[5] / "result.json"
            status = _line(json.loads(result.read_text())) if result.exists() else "no result"
            print(f"{spec[0]} {spec[1]} α={spec[2]:g} seed {spec[3]}: {status}", flush=True)
    print_tables(args.out)


def _line(r: dict) -> str:
    if r["error"]:
        return f"error {r['error'][:120]} ({r['seconds']:.0f} s)"
    key = (f"L1 {r['l1']:.3f}" if r["task"] == "recovery"
           else f"ρ {r['spearman_half']:+.2f} (avg {r['spearman_averaged']:+.2f})")
    return (f"{key}, neg-gap {r['negative_gap_fraction']:.2f}, collapse {r['collapse']}, "
            f"met {met(r)} ({r['seconds']:.0f} s)")


def _clean_top(r: dict) -> bool:
    """``clean`` holds the largest weight averaged over the second half (the demo's own check)."""
    return max(r["half_weights"], key=r["half_weights"].get) == "clean"


def _cell(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def print_tables(out: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/*/result.json"))]
    for task in TASKS:
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        main = ("L1 final (seeds)", "L1 2nd-half avg") if task == "recovery" else (
            "ρ 2nd-half avg (seeds)", "ρ whole-run avg")
        print(f"\n### {task}\n")
        extra = " clean on top |" if task == "demo" else ""
        print(f"| setting | α | steps | {main[0]} | {main[1]} | neg-gap fraction | collapse "
              f"|{extra} met | s/run |")
        print("|---|---|---|---|---|---|---|" + ("---|" if extra else "") + "---|---|")
        keys = sorted({(r["setting"], r["alpha"]) for r in rows},
                      key=lambda k: (list(SETTINGS).index(k[0]), k[1]))
        for setting, alpha in keys:
            runs = sorted((r for r in rows if (r["setting"], r["alpha"]) == (setting, alpha)),
                          key=lambda r: r["seed"])
            ok = [r for r in runs if not r["error"]]
            a, b = ("l1", "l1_half") if task == "recovery" else ("spearman_half",
                                                                  "spearman_averaged")
            errors = len(runs) - len(ok)
            print(f"| {setting} | {alpha:g} | {runs[0]['steps']} | {_cell([r[a] for r in ok])} "
                  f"| {_cell([r[b] for r in ok])} | "
                  f"{_cell([r['negative_gap_fraction'] for r in ok])} | "
                  f"{sum(r['collapse'] for r in runs)}/{len(runs)} | "
                  + (f"{sum(_clean_top(r) for r in ok)}/{len(ok)} | " if extra else "")
                  + f"{sum(met(r) for r in runs)}/{len(runs)}"
                  f"{f' ({errors} stopped)' if errors else ''} | "
                  f"{np.mean([r['seconds'] for r in runs]):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing jobs of a grid, then print the tables")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    r.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["k1"])
    r.add_argument("--alphas", nargs="+", type=float, default=[1.0, 10.0, 100.0])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--recovery-steps", type=int, default=DEFAULT_STEPS["recovery"])
    r.add_argument("--demo-steps", type=int, default=DEFAULT_STEPS["demo"])
    r.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    r.add_argument("--exclude", nargs="*", default=[], metavar="TASK/SETTING",
                   help="combinations to leave out, e.g. recovery/k2_warm")
    r.add_argument("--runs", nargs="*", default=[], metavar="TASK/SETTING/ALPHA/SEED",
                   help="run exactly these, in this order (instead of the grid)")
    j = sub.add_parser("job", help="one run (used by `run`)")
    j.add_argument("--task", choices=TASKS, required=True)
    j.add_argument("--setting", choices=list(SETTINGS), required=True)
    j.add_argument("--alpha", type=float, required=True)
    j.add_argument("--seed", type=int, required=True)
    j.add_argument("--steps", type=int, required=True)
    j.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("table", help="print the tables of the finished runs")
    t.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "job":
        job(args.task, args.setting, args.alpha, args.seed, args.steps, args.out)
    elif args.cmd == "table":
        print_tables(args.out)
    else:
        args.steps = {"recovery": args.recovery_steps, "demo": args.demo_steps}
        run_sweep(args)


if __name__ == "__main__":
    main()
