"""``scalebio mix``: turn learned mixture weights into a training set of exactly N examples.

Counts: the largest-remainder (Hamilton) apportionment of N. With weights π_i (divided by their
sum, which must be 1 within :data:`WEIGHT_SUM_TOL`), quota q_i = N·π_i; every source first gets
⌊q_i⌋, then the R = N − Σ⌊q_i⌋ sources with the largest remainders q_i − ⌊q_i⌋ get one more each,
ties going to the source listed first in the config. Quotas are exact rationals (``Fraction``), so
the counts never depend on float rounding and always sum to N.

Draws: each source has its own numpy Generator seeded by (seed, crc32(name)), so a source's pick
depends only on the seed, its name, its size and its count. A source with at least its count of
records is sampled without replacement. A short source follows ``when_short``:

- ``upsample``: take every record once, then draw the rest uniformly with replacement;
- ``cap``: take every record once; the shortfall is *not* given to other sources (the mixture then
  has fewer than N rows, and the other sources keep exactly their Hamilton counts). A warning is
  logged and the manifest lists the shortfall. Asking for more rows than all sources hold together
  is refused, since no allocation could reach N without repetition.

Records are counted and validated as ``reweight`` reads them (llm/data/sources.py,
llm/data/conversations.py),
before tokenisation: examples that ``reweight`` would drop after truncation are still counted here.
Rows are shuffled with a Generator seeded by the seed alone, so a sequential reader sees a mixture.

Outputs (written to a temporary folder beside ``out``, then renamed into place): ``mixture.jsonl``
(``{"messages": [...], "source": name}`` per line), ``dataset/`` (the same rows, ``save_to_disk``),
``manifest.json``, ``snippets/`` (llm/pipeline/mix_outputs.py) and ``held_out/``: per source,
the records
the mixture did not draw (``{"messages": [...]}`` per line, file order), which ``scalebio evaluate
--held-out`` scores. Same inputs and seed: same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from scalebio.llm import outputs
from scalebio.llm.data import checks
from scalebio.llm.data.conversations import DataError, to_messages
from scalebio.llm.data.sources import SourceSpec, _read_records  # the exact reader `reweight` uses
from scalebio.llm.pipeline.mix_outputs import sha256_of, write_mixture

__all__ = ["ROUNDING_RULE", "WEIGHT_SUM_TOL", "WHEN_SHORT", "MixError", "hamilton_counts",
           "mix", "read_weights", "sources_from_config"]

log = logging.getLogger(__name__)

WHEN_SHORT = ("upsample", "cap")
# weights.json holds float64 weights that sum to 1 up to ~1e-15; 1e-6 also accepts weights
# rounded to six decimals by hand, and refuses anything that is not a distribution.
WEIGHT_SUM_TOL = 1e-6
ROUNDING_RULE = ("largest remainder (Hamilton): floor(N*w_i) each, then one more to the sources "
                 "with the largest remainders N*w_i - floor(N*w_i); ties to the earlier source")
SHORT_RULES = {
    "upsample": "a short source gives every record once, the rest drawn with replacement",
    "cap": "a short source gives every record once; its shortfall is not redistributed",
}


class MixError(ValueError):
    """The mixture cannot be built as asked; the message names the argument, file or source."""


class Pick(NamedTuple):
    """One source's share: its spec, records available, rows requested, record indices taken."""

    spec: SourceSpec
    available: int
    requested: int
    indices: np.ndarray


def hamilton_counts(weights: Sequence[float], total: int) -> list[int]:
    """Apportion ``total`` items by the largest-remainder (Hamilton) method.

    With π_i = w_i / Σw and quotas q_i = total·π_i (exact rationals), count_i = ⌊q_i⌋ plus one
    for the R = total − Σ⌊q_i⌋ largest remainders q_i − ⌊q_i⌋, ties to the smaller index.

    Args:
      weights: non-negative numbers with a positive sum.
      total: the number of items, ≥ 0.

    Returns:
      Counts that sum to ``total`` exactly, each within 1 of its quota.
    """
    exact = [Fraction(w) for w in weights]
    norm = sum(exact)
    if not exact or norm <= 0 or any(w < 0 for w in exact):
        raise MixError(f"weights: non-negative numbers with a positive sum needed, got {weights}")
    quotas = [total * w / norm for w in exact]
    counts = [math.floor(q) for q in quotas]
    left = total - sum(counts)  # 0 ≤ left < len(weights): remainders are < 1 and sum to left
    order = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def read_weights(path: str | os.PathLike, averaged: bool = False) -> tuple[dict, dict | None]:
    """Read ``weights.json``: ({source: weight}, the stored raw config or None).

    ``averaged`` picks ``averaged_weights`` (the time average) instead of the final ``weights``.
    """
    p = Path(path)
    key = "averaged_weights" if averaged else "weights"
    if not p.is_file():
        raise MixError(f"--weights {p}: file not found")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixError(f"--weights {p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(key), dict) or not doc[key]:
        raise MixError(f"--weights {p}: no {key!r} mapping of source to weight")
    config = doc.get("config")
    return doc[key], config if isinstance(config, dict) else None


def sources_from_config(raw: dict, origin: str, base: Path) -> list[SourceSpec]:
    """The ``data.sources`` list of a raw config as SourceSpecs; relative paths join ``base``."""
    sources = (raw.get("data") or {}).get("sources") if isinstance(raw, dict) else None
    if not isinstance(sources, list) or not sources:
        raise MixError(f"{origin}: data.sources: a non-empty list of sources is required")
    specs, seen = [], set()
    for i, entry in enumerate(sources):
        key = f"{origin}: data.sources[{i}]"
        if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
            raise MixError(f"{key}: a mapping with name, path (and format) is required")
        unknown = set(entry) - {"name", "path", "format"}
        if unknown:
            raise MixError(f"{key}: unknown field(s) {sorted(unknown)}")
        path = Path(str(entry["path"])).expanduser()
        path = path if path.is_absolute() else (base / path).resolve()
        try:
            spec = SourceSpec(str(entry["name"]), str(path), str(entry.get("format", "alpaca")))
        except DataError as e:  # an empty name, an unknown format
            raise MixError(f"{key}: {e}") from None
        if spec.name in seen:
            raise MixError(f"{key}: duplicate source name {spec.name!r}")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _ordered_weights(weights: dict, specs: list[SourceSpec], origin: str) -> list[float]:
    """The weights in config order, after checking names, values and the sum."""
    names = [s.name for s in specs]
    unknown = [n for n in weights if n not in names]
    missing = [n for n in names if n not in weights]
    if unknown or missing:
        raise MixError(f"{origin}: weights and config sources differ: weights name unknown "
                       f"source(s) {unknown}; config source(s) {missing} have no weight")
    out = []
    for n in names:
        w = weights[n]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise MixError(f"{origin}: weight of {n!r} must be a finite number >= 0, got {w!r}")
        out.append(float(w))
    if abs(math.fsum(out) - 1.0) > WEIGHT_SUM_TOL:
        raise MixError(f"{origin}: weights sum to {math.fsum(out)!r}, not 1 "
                       f"(tolerance {WEIGHT_SUM_TOL})")
    return out


def _draw(available: int, count: int, when_short: str, rng: np.random.Generator) -> np.ndarray:
    """Record indices: without replacement if enough; else all once (+ replacement if upsample)."""
    if count <= available:
        return rng.choice(available, size=count, replace=False)
    everything = rng.permutation(available)
    if when_short == "cap":
        return everything
    return np.concatenate([everything, rng.integers(0, available, size=count - available)])


def _source_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def count_records(spec: SourceSpec) -> int:
    """Read and validate every record (same errors as `reweight`); return how many there are."""
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"{path}: source {spec.name!r}: no such file or folder")
    n = 0
    with checks.diagnosed([spec], max_length=0):  # a byte that is not UTF-8: file and line
        for loc, record in _read_records(path):
            to_messages(record, spec.format, loc)
            n += 1
    if n == 0:
        raise DataError(f"{path}: source {spec.name!r} is empty (no records)")
    return n


def _take(pick: Pick) -> tuple[list[dict], list[dict]]:
    """Second pass over the source: (the picked records' rows in pick order, the records never
    picked, in file order: the source's held-out split)."""
    wanted = set(pick.indices.tolist())
    kept, held_out = {}, []
    for i, (loc, record) in enumerate(_read_records(Path(pick.spec.path))):
        messages = to_messages(record, pick.spec.format, loc)
        if i in wanted:
            kept[i] = messages
        else:
            held_out.append({"messages": messages})
    rows = [{"messages": kept[i], "source": pick.spec.name} for i in pick.indices.tolist()]
    return rows, held_out


def _check_out(out: Path, overwrite: bool, protected: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise MixError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MixError(f"--out {out}: folder exists and is not empty; pass --overwrite")
        outputs.refuse_deleting_inputs(out, overwrite, protected, MixError)


def mix(weights_path: str | os.PathLike, out: str | os.PathLike, num_examples: int, *,
        config_path: str | os.PathLike | None = None, seed: int = 0, averaged: bool = False,
        when_short: str = "upsample", overwrite: bool = False, progress: bool = True) -> dict:
    """Build a mixture of ``num_examples`` rows from learned weights and write it to ``out``.

    Args:
      weights_path: a ``weights.json`` written by ``scalebio reweight``.
      out: output folder; an existing non-empty one is refused unless ``overwrite``.
      num_examples: N ≥ 1, the rows requested (exactly N unless ``cap`` meets a short source).
      config_path: YAML/JSON config whose ``data.sources`` to use (relative paths join its
        folder); default: the config stored in ``weights.json`` (relative paths join its folder).
      seed: non-negative integer seed of every draw.
      averaged: use ``averaged_weights`` instead of the final ``weights``.
      when_short: ``"upsample"`` or ``"cap"`` (module docstring).
      overwrite: replace a non-empty ``out``.
      progress: tqdm bars while reading sources.

    Returns:
      The manifest (also written to ``out/manifest.json``).
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise MixError(f"--num-examples: a positive integer is required, got {num_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MixError(f"--seed: a non-negative integer is required, got {seed!r}")
    if when_short not in WHEN_SHORT:
        raise MixError(f"--when-short: expected one of {WHEN_SHORT}, got {when_short!r}")
    wpath, out = Path(weights_path).resolve(), Path(out).resolve()
    weights, stored = read_weights(wpath, averaged)
    if config_path is not None:
        cpath = Path(config_path).resolve()
        if not cpath.is_file():
            raise MixError(f"--config {cpath}: file not found")
        try:
            raw = yaml.safe_load(cpath.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise MixError(f"--config {cpath}: not valid YAML/JSON ({e})") from None
        specs = sources_from_config(raw, f"--config {cpath}", cpath.parent)
    elif stored is None:
        raise MixError(f"--weights {wpath}: holds no 'config'; pass --config with data.sources")
    else:
        specs = sources_from_config(stored, f"--weights {wpath} (stored config)", wpath.parent)
    probs = _ordered_weights(weights, specs, f"--weights {wpath}")
    _check_out(out, overwrite, [wpath] + [Path(s.path) for s in specs])

    from tqdm.auto import tqdm

    bar = tqdm(specs, desc="reading sources", disable=not progress)
    available = [count_records(s) for s in bar]
    if when_short == "cap" and num_examples > sum(available):
        raise MixError(f"--num-examples {num_examples}: the sources hold only {sum(available)} "
                       "records; use --when-short upsample or a smaller N")
    counts = hamilton_counts(probs, num_examples)
    picks = [Pick(s, n, c, _draw(n, c, when_short, _source_rng(seed, s.name)))
             for s, n, c in zip(specs, available, counts)]
    for p in picks:
        if p.requested > p.available:
            log.warning("source %r: %d requested, only %d records: %s", p.spec.name, p.requested,
                        p.available, "upsampled with replacement" if when_short == "upsample"
                        else f"capped, {p.requested - p.available} fewer rows in the mixture")
    rows, held_out = [], {}
    for p in tqdm(picks, desc="taking rows", disable=not progress):
        taken, held_out[p.spec.name] = _take(p)
        rows += taken
    rows = [rows[i] for i in np.random.default_rng([seed]).permutation(len(rows))]
    manifest = {
        "num_examples_requested": num_examples,
        "num_examples_written": len(rows),
        "weights_file": str(wpath),
        "weights_key": "averaged_weights" if averaged else "weights",
        "weights": dict(zip([s.name for s in specs], probs)),
        "rounding": ROUNDING_RULE,
        "when_short": when_short,
        "when_short_rule": SHORT_RULES[when_short],
        "seed": seed,
        "row_order": "shuffled by numpy default_rng([seed]); per-source draws by "
                     "default_rng([seed, crc32(name)])",
        "sources": [_source_entry(p) for p in picks],
    }
    write_mixture(out, rows, manifest, specs, probs, overwrite, progress, held_out)
    return manifest


def _source_entry(p: Pick) -> dict[str, Any]:
    taken = len(p.indices)
    return {"name": p.spec.name, "path": p.spec.path, "format": p.spec.format,
            "sha256": sha256_of(Path(p.spec.path)), "available": p.available,
            "requested": p.requested, "taken": taken,
            "distinct": len(np.unique(p.indices)), "shortfall": p.requested - taken}
