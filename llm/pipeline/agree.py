"""``scalebio agree``: do several runs (seeds) of ``reweight`` or a baseline learn the same weights?

Reads ``weights.json`` from each run folder and reports, for the final and the time-averaged
weights alike:

* per source: mean, sample standard deviation (ddof = 1: the seeds are a sample of the seeds one
  could have run), min and max over runs;
* rank agreement: Spearman's ρ for every pair of runs (Pearson correlation of the average ranks)
  and Kendall's coefficient of concordance W over all runs,
  W = 12·S / (m²(n³ − n) − m·T), with m runs, n sources, R_j the sum over runs of source j's
  rank, S = Σ_j (R_j − m(n + 1)/2)² and T = Σ_runs Σ_ties (t³ − t) the tie correction
  (W = 1: every run orders the sources the same way; W = 0: no agreement);
* whether every run puts the same source on top.

Outputs in ``out``: ``agreement.json``, ``agreement.png`` (per source, the mean inside a min–max
band) and ``weights.json`` holding the mean weights in the format of ``scalebio reweight``, so that
``scalebio mix --weights OUT/weights.json`` draws a mixture from them.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from scalebio.llm import outputs, run_folder

KINDS = {"final": "weights", "averaged": "averaged_weights"}  # report section -> weights.json key
# Rules of thumb for reading W in the summary (Landis–Koch-like bands; they only word the
# paragraph, every number is in agreement.json).
STRONG_W, MODERATE_W = 0.8, 0.5


class AgreeError(ValueError):
    """The runs cannot be compared; the message names the folder or the argument."""


class Run(NamedTuple):
    """One run folder's weights: source names (file order) and {kind: float64 array}."""

    folder: Path
    names: list[str]
    weights: dict[str, np.ndarray]
    config: dict | None


# ---------------------------------------------------------------- reading


def read_run(folder: str | Path) -> Run:
    """Read ``folder/weights.json``; refuse (:class:`AgreeError`, naming the folder) a missing
    or unreadable file, a missing weights mapping, or a weight that is not a finite number ≥ 0."""
    folder = Path(folder)
    path = folder / "weights.json"
    if not path.is_file():
        raise AgreeError(f"--runs {folder}: no weights.json (not a finished reweight/baseline run)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AgreeError(f"--runs {folder}: weights.json is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise AgreeError(f"--runs {folder}: weights.json is not a JSON object")
    names, weights = None, {}
    for kind, key in KINDS.items():
        mapping = doc.get(key)
        if not isinstance(mapping, dict) or not mapping:
            raise AgreeError(f"--runs {folder}: weights.json has no {key!r} mapping of source "
                             "to weight")
        if names is None:
            names = list(mapping)
        elif set(mapping) != set(names):
            raise AgreeError(f"--runs {folder}: weights.json: {key!r} and 'weights' name "
                             "different sources")
        values = []
        for n in names:
            w = mapping[n]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                    or w < 0:
                raise AgreeError(f"--runs {folder}: weights.json: {key}[{n!r}] must be a finite "
                                 f"number >= 0, got {w!r}")
            values.append(float(w))
        if sum(values) <= 0:
            raise AgreeError(f"--runs {folder}: weights.json: {key!r} are all 0")
        weights[kind] = np.asarray(values, dtype=np.float64)
    config = doc.get("config")
    return Run(folder, names, weights, config if isinstance(config, dict) else None)


def read_runs(folders) -> list[Run]:
    """Read every run; refuse fewer than 2, a folder given twice, or differing source names.
    Every run's weights are put in the first run's source order."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise AgreeError(f"--runs: at least 2 run folders are needed, got {len(folders)}")
    seen = {}
    for f in folders:
        key = f.resolve()
        if key in seen:
            raise AgreeError(f"--runs {f}: given twice (also as {seen[key]}); a run compared "
                             "with itself inflates the agreement")
        seen[key] = f
    runs = [read_run(f) for f in folders]
    ref = runs[0]
    aligned = [ref]
    for r in runs[1:]:
        if set(r.names) != set(ref.names):
            only_here = sorted(set(r.names) - set(ref.names))
            only_ref = sorted(set(ref.names) - set(r.names))
            raise AgreeError(f"--runs {r.folder}: its sources differ from those of {ref.folder}: "
                             f"only in {r.folder}: {only_here}; only in {ref.folder}: {only_ref}")
        order = [r.names.index(n) for n in ref.names]
        aligned.append(r._replace(names=list(ref.names),
                                  weights={k: v[order] for k, v in r.weights.items()}))
    return aligned


# ---------------------------------------------------------------- statistics


def average_ranks(values) -> np.ndarray:
    """Ranks 1..n of ``values`` ascending, equal values sharing the mean of their ranks."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # positions i..j hold ranks i+1..j+1
        i = j + 1
    return ranks


def spearman(a, b) -> float | None:
    """Spearman's ρ: the Pearson correlation of the average ranks; None when either run gives
    every source the same rank (the correlation is then undefined)."""
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return None if den == 0 else float(ra @ rb) / den


def _tie_sum(values) -> float:
    """Σ over groups of equal values of t³ − t (t the group's size)."""
    _, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
    return float(np.sum(counts.astype(np.float64) ** 3 - counts))


def kendall_w(matrix) -> float | None:
    """Kendall's W of ``matrix`` (runs × sources; formula in the module docstring), tie-corrected;
    None when undefined (one source, or every run ties every source)."""
    m, n = np.shape(matrix)
    ranks = np.stack([average_ranks(row) for row in matrix])
    s = float(np.sum((ranks.sum(axis=0) - m * (n + 1) / 2) ** 2))
    den = m * m * (n ** 3 - n) - m * sum(_tie_sum(row) for row in matrix)
    return None if den <= 0 else 12 * s / den


def source_stats(matrix, names) -> dict:
    """Per source: mean, sample std (ddof = 1), min, max over runs, and the values per run."""
    x = np.asarray(matrix, dtype=np.float64)
    std = x.std(axis=0, ddof=1)
    return {n: {"mean": float(x[:, j].mean()), "std": float(std[j]), "min": float(x[:, j].min()),
                "max": float(x[:, j].max()), "values": x[:, j].tolist()}
            for j, n in enumerate(names)}


def top_sources(matrix, names) -> list[list[str]]:
    """Per run, the source(s) with the largest weight (more than one on an exact tie)."""
    return [[n for n, w in zip(names, row) if w == row.max()] for row in np.asarray(matrix)]


def agreement(matrix, names, labels) -> dict:
    """Every statistic of one kind of weights (``matrix``: runs × sources, rows labelled)."""
    pairs = [{"a": labels[i], "b": labels[j], "rho": spearman(matrix[i], matrix[j])}
             for i in range(len(labels)) for j in range(i + 1, len(labels))]
    rhos = [p["rho"] for p in pairs if p["rho"] is not None]
    tops = top_sources(matrix, names)
    same = all(len(t) == 1 for t in tops) and len({t[0] for t in tops}) == 1
    return {
        "per_source": source_stats(matrix, names),
        "spearman": {"pairs": pairs, "mean": float(np.mean(rhos)) if rhos else None,
                     "min": min(rhos) if rhos else None},
        "kendall_w": kendall_w(matrix),
        "top": {"per_run": dict(zip(labels, tops)), "same_in_every_run": same,
                "source": tops[0][0] if same else None},
    }


# ---------------------------------------------------------------- report


def _wording(w: float) -> str:
    if w >= STRONG_W:
        return "strongly"
    return "moderately" if w >= MODERATE_W else "weakly"


def summarise(doc: dict, out: Path | None = None) -> str:
    """One plain-language paragraph: ordering agreement, the top source, the least stable
    source, and whether to use the mean weights."""
    final, m, n = doc["final"], doc["num_runs"], len(doc["names"])
    w, rho = final["kendall_w"], final["spearman"]
    if w is None:
        parts = [f"Across {m} runs, the final weights of the {n} sources cannot be compared by "
                 "rank (each run gives them all the same weight)"]
    else:
        parts = [f"Across {m} runs, the final weights of the {n} sources agree {_wording(w)} in "
                 "their ordering"]
        rhos = [p["rho"] for p in rho["pairs"] if p["rho"] is not None]
        span = f"{min(rhos):.2f} to {max(rhos):.2f}" if rhos else "undefined"
        parts[0] += (f" (Kendall's W = {w:.2f}, where 1 means every run orders them the same "
                     f"way and 0 no agreement; Spearman's rho between pairs of runs: {span})")
    parts[0] += "."
    stats = final["per_source"]
    top = final["top"]
    if top["same_in_every_run"]:
        parts.append(f"Every run puts {top['source']!r} on top (mean weight "
                     f"{stats[top['source']]['mean']:.3f}).")
    else:
        per_run = "; ".join(f"{k}: {', '.join(v)}" for k, v in top["per_run"].items())
        parts.append(f"The top source is not the same in every run ({per_run}), so do not rely "
                     "on which source matters most.")
    shaky = max(stats, key=lambda s: stats[s]["std"])
    st = stats[shaky]
    parts.append(f"The least stable source is {shaky!r}: {st['mean']:.3f} on average, from "
                 f"{st['min']:.3f} to {st['max']:.3f} (std {st['std']:.3f}).")
    if doc["config_differences"]:
        parts.append("The runs differ in more than the seed (config "
                     f"{', '.join(doc['config_differences'][:5])}), so this compares set-ups.")
    wa = doc["averaged"]["kendall_w"]
    parts.append("The time-averaged weights give W = "
                 f"{'undefined' if wa is None else f'{wa:.2f}'}.")
    if n <= 2:
        parts.append("With only 2 sources a ranking says little: judge by the spreads.")
    where = f" in {out / 'weights.json'}" if out is not None else ""
    if w is not None and w >= STRONG_W and top["same_in_every_run"]:
        parts.append(f"The runs agree well enough to use the mean weights{where} "
                     "(scalebio mix --weights).")
    else:
        parts.append(f"Treat the weights with caution: the mean weights{where} average runs that "
                     "disagree; train longer or run more seeds before relying on them.")
    return " ".join(parts)


def plot_agreement(path: Path, doc: dict) -> None:
    """Per source, each run's weight (dots) and the mean (diamond) inside its min–max band; one
    panel for the final and one for the time-averaged weights; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = doc["names"]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names)), 4), sharey=True)
    for ax, kind in zip(axes, KINDS):
        stats = doc[kind]["per_source"]
        lo = np.array([stats[n]["min"] for n in names])
        hi = np.array([stats[n]["max"] for n in names])
        ax.bar(x, hi - lo, bottom=lo, width=0.5, alpha=0.3, color="tab:blue",
               label="min–max over runs")
        for j, n in enumerate(names):
            vals = stats[n]["values"]
            ax.plot([j] * len(vals), vals, ".", color="tab:gray",
                    label="one run" if j == 0 else None)
        ax.plot(x, [stats[n]["mean"] for n in names], "D", color="tab:blue", label="mean")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(f"{kind} weights, {doc['num_runs']} runs")
    axes[0].set_ylabel("weight π")
    axes[0].set_ylim(bottom=0)  # weights are ≥ 0: a band reads against the full scale
    axes[0].legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    outputs.atomic_write_bytes(path, buf.getvalue())


def _stored_config(run: Run) -> dict | None:
    """The first run's config, its data paths made absolute (``mix`` resolves relative ones
    against the folder of the weights.json it reads, which is now another folder)."""
    if run.config is None:
        return None
    config = json.loads(json.dumps(run.config))  # a deep copy
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    entries = [e for key in ("sources", "validation") if isinstance(data.get(key), list)
               for e in data[key]]
    for s in entries:
        if isinstance(s, dict) and isinstance(s.get("path"), str):
            s["path"] = str((run.folder / Path(s["path"]).expanduser()).resolve())
    return config


def _flatten(d, prefix: str = "") -> dict:
    """{"a.b": value} for every leaf of nested dicts (lists are leaves)."""
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return flat


def config_differences(read: list[Run]) -> list[str]:
    """The config keys (``section.key``) whose value is not the same in every run that stores a
    config, ``run.seed`` aside (the point of the comparison): runs that differ in anything else
    compare set-ups, not seeds."""
    flats = [_flatten(r.config) for r in read if r.config is not None]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if k != "run.seed"
            and any(f.get(k, "<unset>") != flats[0].get(k, "<unset>") for f in flats)]


def agree(runs, out: str | Path, *, overwrite: bool = False) -> dict:
    """Compare the runs in the folders ``runs`` and write the report to ``out``.

    Args:
      runs: two or more folders, each holding the ``weights.json`` of a reweight/baseline run.
      out: output folder; an existing non-empty one is refused unless ``overwrite``.
      overwrite: replace a non-empty ``out`` (refused when ``out`` holds one of the runs).

    Returns:
      The agreement document (also ``out/agreement.json``), with its ``summary`` paragraph.
    """
    labels = [str(r) for r in runs]
    read = read_runs(runs)
    out = Path(out)
    if not overwrite and out.is_dir() and any(p.name != run_folder.LOCK_NAME
                                              for p in out.iterdir()):
        raise AgreeError(f"--out {out}: folder exists and is not empty; pass --overwrite")
    outputs.prepare_out_dir(out, resume=False, overwrite=overwrite, inputs=[r.folder for r in read])
    names = read[0].names
    doc = {"runs": labels, "names": names, "num_runs": len(read),
           "std": "sample standard deviation over runs (ddof = 1)",
           "config_differences": config_differences(read)}
    for kind in KINDS:
        doc[kind] = agreement(np.stack([r.weights[kind] for r in read]), names, labels)
    doc["summary"] = summarise(doc, out)
    outputs.atomic_write_text(out / "agreement.json",
                              json.dumps(doc, indent=2, allow_nan=False) + "\n")
    plot_agreement(out / "agreement.png", doc)
    means = {k: [doc[k]["per_source"][n]["mean"] for n in names] for k in KINDS}
    extra = {"names": names, "method": "mean over runs", "runs": labels,
             "agreement": "agreement.json"}
    config = _stored_config(read[0])
    if config is not None:
        extra["config"] = config
        extra["config_from"] = labels[0]
    # last: weights.json marks the folder's run as finished (run_folder's products)
    outputs.write_weights_json(out / "weights.json", names, means["final"], means["averaged"],
                               extra)
    return doc
