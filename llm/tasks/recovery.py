"""Mixture recovery at small LLM scale: validation drawn as a known mixture π° of the sources.

Two designs (docs/results.md §3):

* ``styles`` — *identifiable*. Every source answers the same prompts ("What is a + b?") in its own
  style: ``digits`` (3 random digits, not the sum), ``lower`` (3 random lowercase
  letters), ``symbols`` (3 random punctuation marks), ``upper`` (3 random uppercase letters).
  Answers have equal length, so token shares equal example shares. A model trained on mixture π
  learns p(answer | prompt) = Σ_k π_k p_k(answer | prompt) (the styles have disjoint first
  characters), and the validation cross-entropy of that prediction is minimised exactly at π = π°:
  the well-specified case of theory/README.md, with a zero-weight style (``upper``) as distractor.
* ``disjoint`` — *not identifiable*. The demo's sources, validation 60 % clean additions + 40 %
  prose. Arithmetic and prose prompts never overlap, so a model with enough capacity fits both
  whatever the (positive) weights: the validation loss does not single out π°; what decides the
  weights is which source removes validation loss fastest, and the token-mean loss counts prose
  (long answers) several times more than sums (2-3 characters).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np

from scalebio.llm import outputs
from scalebio.llm.config_files import config_from_dict
from scalebio.llm.pipeline.mix import hamilton_counts
from scalebio.llm.tasks.demo import demo_config
from scalebio.llm.tasks.demo_data import (
    addition_examples,
    alpaca_record,
    draw_from_pool,
    prose_pool,
    write_demo_sources,
    write_jsonl,
)

STYLES = ("digits", "lower", "symbols", "upper")
STYLES_TARGET = {"digits": 0.5, "lower": 0.3, "symbols": 0.2, "upper": 0.0}
DISJOINT_TARGET = {"clean": 0.6, "prose": 0.4}
ANSWER_CHARS = 3
_ALPHABETS = {
    "digits": np.array(list(string.digits)),
    "lower": np.array(list(string.ascii_lowercase)),
    "symbols": np.array(list("!#$%&*+-/<=>?@^~")),
    "upper": np.array(list(string.ascii_uppercase)),
}


def style_examples(rng: np.random.Generator, n: int, style: str) -> list[dict]:
    """``n`` prompts "What is a + b?" (a, b uniform on 10..99) answered in ``style``."""
    if style not in STYLES:
        raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
    records = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(10, 100, size=2))
        answer = "".join(rng.choice(_ALPHABETS[style], size=ANSWER_CHARS))
        records.append(alpaca_record(f"What is {a} + {b}?", answer))
    return records


def mixture_counts(target: dict[str, float], n: int) -> dict[str, int]:
    """n·π° apportioned by ``mix``'s largest-remainder rule (counts sum to n exactly)."""
    return dict(zip(target, hamilton_counts(list(target.values()), n)))


def write_styles_task(out_dir: Path, seed: int, n_train: int, n_val: int) -> dict:
    """One file per style (own stream per style) and a validation file drawn as π° (own streams)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, style in enumerate(STYLES):
        path = out_dir / f"{style}.jsonl"
        write_jsonl(path, style_examples(np.random.default_rng([seed, i]), n_train, style))
        sources.append({"name": style, "path": str(path), "format": "alpaca"})
    counts = mixture_counts(STYLES_TARGET, n_val)
    records = []
    for i, style in enumerate(STYLES):
        records += style_examples(np.random.default_rng([seed, 100 + i]), counts[style], style)
    return {"sources": sources, "val": _write_val(out_dir, records, seed)}


def write_disjoint_task(out_dir: Path, seed: int, n_train: int, n_val: int) -> dict:
    """The demo's sources; validation = π°(clean) fresh additions + π°(prose) prose examples."""
    data = write_demo_sources(out_dir, seed=seed, n_train_per_source=n_train, n_val=n_val)
    counts = mixture_counts(DISJOINT_TARGET, n_val)
    rng = np.random.default_rng([seed, 7001])
    records = addition_examples(rng, counts["clean"])
    records += draw_from_pool(rng, prose_pool(), counts["prose"])
    return {"sources": data["sources"], "val": _write_val(out_dir, records, seed)}


def _write_val(out_dir: Path, records: list[dict], seed: int) -> dict:
    order = np.random.default_rng([seed, 7002]).permutation(len(records))
    path = out_dir / "val_mixture.jsonl"
    write_jsonl(path, [records[int(i)] for i in order])
    return {"name": "val_mixture", "path": str(path), "format": "alpaca"}


def l1(weights: dict[str, float], target: dict[str, float]) -> float:
    """Σ_k |w_k − π°_k| over the sources of ``weights`` (π° = 0 where not named)."""
    return float(sum(abs(w - target.get(n, 0.0)) for n, w in weights.items()))


def l1_curve(rows: list[dict], names: list[str], target: dict[str, float],
             checkpoints: list[int]) -> list[dict]:
    """L1 to π° after each checkpoint step t of: the weights at t, their average over steps 1..t
    (what ``averaged_weights`` reports at t) and their average over the last quarter, (3t/4, t]
    (Adam's λ oscillates around its target; the tail average damps that without the transient)."""
    w = np.array([[r[f"weight/{n}"] for n in names] for r in rows])
    curve = []
    for t in checkpoints:
        if 1 <= t <= len(w):
            tail = w[(3 * t) // 4 : t].mean(axis=0)
            curve.append({"step": t,
                          "l1": l1(dict(zip(names, w[t - 1].tolist())), target),
                          "l1_averaged": l1(dict(zip(names, w[:t].mean(axis=0).tolist())), target),
                          "l1_tail": l1(dict(zip(names, tail.tolist())), target)})
    return curve


def recovery_run(out: Path, design: str, steps: int, seed: int, bilevel: dict | None = None,
                 n_train: int = 1000, n_val: int = 200, per_source: int = 16, threads: int = 2,
                 progress: bool = True) -> dict:
    """Write the task under ``out/data``, run ``reweight`` into ``out/run``; returns the summary.

    ``bilevel``: keys of the ``bilevel`` config section (alpha, lr_lambda, lambda_optimizer,
    schedule, geometry, ...) that replace the demo's (llm/tasks/demo.py, ``DEMO_BILEVEL``).
    """
    from scalebio.llm.loop.reweight import reweight

    writers = {"styles": (write_styles_task, STYLES_TARGET),
               "disjoint": (write_disjoint_task, DISJOINT_TARGET)}
    if design not in writers:
        raise ValueError(f"design: expected one of {tuple(writers)}, got {design!r}")
    write, target = writers[design]
    outputs.prepare_out_dir(out, resume=False, overwrite=False)
    data = write(out / "data", seed, n_train, n_val)
    raw = demo_config(data, steps, seed, per_source, threads)
    raw["bilevel"].update(bilevel or {})
    raw["data"]["cache_dir"] = str(out / "cache")
    raw["run"]["tracker"] = "none"
    doc = reweight(config_from_dict(raw, f"recovery {design}"), out / "run", progress=progress,
                   raw_config=raw)
    names = doc["names"]
    checkpoints = sorted({max(1, steps // 4), steps // 2, steps})
    summary = {"design": design, "bilevel": raw["bilevel"], "alpha": raw["bilevel"]["alpha"],
               "steps": steps, "seed": seed, "n_val": n_val,
               "target": {n: target.get(n, 0.0) for n in names},
               "weights": doc["weights"], "averaged_weights": doc["averaged_weights"],
               "l1": l1(doc["weights"], target),
               "l1_averaged": l1(doc["averaged_weights"], target),
               "l1_uniform": l1({n: 1 / len(names) for n in names}, target),
               "curve": l1_curve(doc["rows"], names, target, checkpoints)}
    outputs.atomic_write_text(out / "recovery.json", json.dumps(summary, indent=2) + "\n")
    return summary
