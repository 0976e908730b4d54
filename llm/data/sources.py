"""Multi-source SFT data: read each source, tokenise it (llm/data/conversations.py), cache it.

A *source* is one file (``.jsonl``; ``.json``: a list of records or JSON Lines; ``.parquet``) or
one ``datasets`` save_to_disk folder, named by a :class:`SourceSpec` with a format of
:data:`FORMATS`. Mixture weights refer to sources by name, never by position. Examples left without
a supervised token after truncation are dropped, counted in :attr:`SourceData.dropped` and logged.

Cache: ``cache_dir/<stem>-<key>.arrow`` written by ``Dataset.map`` (atomic rename: concurrent ranks
at worst tokenise twice) and a ``.json`` sidecar of counts. The key hashes the absolute path, size
and mtime (of every file, for a folder), format, tokenizer (backend JSON or vocabulary, chat
template, BOS/EOS, name), ``max_length`` and :data:`PIPELINE_VERSION`. A hit memory-maps the Arrow
file and neither reads the source nor calls the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from datasets import Dataset

from scalebio.llm.data.conversations import (
    FORMATS,
    IGNORE_INDEX,
    DataError,
    to_messages,
    tokenise_batch,
)

__all__ = ["FORMATS", "IGNORE_INDEX", "PIPELINE_VERSION", "DataError", "SourceData", "SourceSpec",
           "load_sources", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump whenever tokenisation changes: it is part of every cache key
_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "n_target": datasets.Value("int32"),
})


@dataclass(frozen=True)
class SourceSpec:
    """One named source: a file or ``save_to_disk`` folder in one of :data:`FORMATS`."""

    name: str
    path: str
    format: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DataError(f"SourceSpec.name: a non-empty string is required, got {self.name!r}")
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise DataError(f"SourceSpec.path of {self.name!r}: a path is required")
        if self.format not in FORMATS:
            raise DataError(f"SourceSpec.format of {self.name!r} ({self.path}): unknown format "
                            f"{self.format!r}; expected one of {FORMATS}")


class SourceData(NamedTuple):
    """Tokenised sources. Each Dataset has columns ``input_ids``, ``labels``, ``n_target``; ``val``
    also has ``source`` (index into ``val_names``). ``dropped`` maps each train name, and
    ``"val:" + name`` for each validation source, to its number of dropped examples."""

    names: tuple[str, ...]
    train: tuple[Dataset, ...]
    val: Dataset
    dropped: dict[str, int]
    val_names: tuple[str, ...]


# ---------------------------------------------------------------- reading


def _table_rows(path: Path) -> Any:
    """Rows of a parquet file or of a save_to_disk folder."""
    if path.is_file():
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types; all mean "not a parquet file"
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if (path / "dataset_dict.json").exists():
        raise DataError(f"{path}: a DatasetDict folder; point the source at one split folder")
    if not (path / "state.json").exists():
        raise DataError(f"{path}: a folder source must be a `datasets` save_to_disk folder")
    return datasets.load_from_disk(str(path))


def _read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record); the location names the file and the line/record/row."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        yield from ((f"{path}: row {i}", row) for i, row in enumerate(_table_rows(path)))
        return
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if suffix == ".json" and head.startswith("["):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
        for i, row in enumerate(rows):
            yield f"{path}: record {i}", row
        return
    hint = " (.json holds a list of records or one record per line)" if suffix == ".json" else ""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg}){hint}") from e
                yield f"{path}:{lineno}", row


# ---------------------------------------------------------------- caching and the public loader


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything about the tokenizer that changes token ids or the rendering."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = json.loads(backend.to_str())
        body.pop("truncation", None)  # runtime settings that calls may toggle; ids do not change
        body.pop("padding", None)
        vocab = json.dumps(body, sort_keys=True)
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), vocab,
             repr(getattr(tokenizer, "chat_template", None)), repr(tokenizer.bos_token),
             repr(tokenizer.eos_token)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _file_stats(path: Path) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path)) if path.is_dir() else "", p.stat().st_size,
             p.stat().st_mtime_ns] for p in files]


def _load_one(spec: SourceSpec, tokenizer: Any, tok_key: str, max_length: int,
              cache_dir: Path) -> tuple[Dataset, int]:
    path = Path(spec.path).expanduser().resolve()
    if not path.exists():
        raise DataError(f"{path}: source {spec.name!r}: no such file or folder")
    key = hashlib.sha256(json.dumps(
        [PIPELINE_VERSION, str(path), _file_stats(path), spec.format, tok_key, max_length]
    ).encode()).hexdigest()[:32]
    arrow = cache_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)}-{key}.arrow"
    meta = arrow.with_suffix(".json")
    if arrow.exists() and meta.exists():
        info = json.loads(meta.read_text())
        ds = Dataset.from_file(str(arrow))
        log.info("source %r: %d examples from cache %s", spec.name, len(ds), arrow)
    else:
        locs, messages = [], []
        for loc, record in _read_records(path):
            locs.append(loc)
            messages.append(to_messages(record, spec.format, loc))
        if not locs:
            raise DataError(f"{path}: source {spec.name!r} is empty (no records)")
        stats = {"inexact": 0}
        raw = Dataset.from_dict({"messages": messages, "loc": locs})
        ds = raw.map(
            tokenise_batch, batched=True, remove_columns=["messages", "loc"], features=_FEATURES,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "stats": stats},
            cache_file_name=str(arrow), load_from_cache_file=False, new_fingerprint=key,
            desc=f"tokenising {spec.name}",
        )
        info = {"records": len(locs), "dropped": len(locs) - len(ds),
                "inexact_boundaries": stats["inexact"]}
        tmp = meta.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, meta)  # atomic: a reader sees the whole sidecar or none
        if info["inexact_boundaries"]:
            log.warning("source %r: %d response boundaries fall inside a token "
                        "(llm/data/conversations.py)", spec.name, info["inexact_boundaries"])
    if len(ds) == 0:
        raise DataError(
            f"{path}: source {spec.name!r} has no usable example: all {info['records']} records "
            f"have no response token left after truncation to max_length={max_length}"
        )
    if info["dropped"]:
        log.warning("source %r: dropped %d of %d examples with no response token left "
                    "(max_length=%d)", spec.name, info["dropped"], info["records"], max_length)
    return ds, info["dropped"]


def _check_specs(specs: Sequence[SourceSpec], role: str) -> None:
    if isinstance(specs, (str, SourceSpec)) or not isinstance(specs, Sequence) or not specs:
        raise DataError(f"{role}: a non-empty list of SourceSpec is required, got {specs!r}")
    seen: dict[str, str] = {}
    for s in specs:
        if not isinstance(s, SourceSpec):
            raise DataError(f"{role}: every entry must be a SourceSpec, got {s!r}")
        if s.name in seen:
            raise DataError(f"{role}: duplicate source name {s.name!r} ({seen[s.name]}, {s.path})")
        seen[s.name] = str(s.path)


def load_sources(train: Sequence[SourceSpec], val: Sequence[SourceSpec], tokenizer: Any,
                 max_length: int, cache_dir: str | os.PathLike) -> SourceData:
    """Read, normalise, tokenise (or load from cache) the training sources and the validation set.

    Args:
      train: one spec per training source; names must be unique and are the mixture's keys.
      val: one or more validation specs, concatenated into one validation set.
      tokenizer: a Hugging Face tokenizer (chat template used when present).
      max_length: truncation length in tokens (≥ 2, so that one target survives the shift).
      cache_dir: folder for the Arrow caches (created if missing).

    Returns:
      :class:`SourceData`. Raises :class:`DataError` naming the file and line/field on bad input.
    """
    _check_specs(train, "train")
    _check_specs(val, "val")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise DataError(f"max_length: an integer >= 2 is required, got {max_length!r}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tok_key = tokenizer_fingerprint(tokenizer)
    dropped: dict[str, int] = {}
    train_sets = []
    for spec in train:
        ds, dropped[spec.name] = _load_one(spec, tokenizer, tok_key, max_length, cache)
        train_sets.append(ds)
    val_sets = []
    for k, spec in enumerate(val):
        ds, dropped[f"val:{spec.name}"] = _load_one(spec, tokenizer, tok_key, max_length, cache)
        val_sets.append(ds.add_column("source", [k] * len(ds)))
    return SourceData(
        names=tuple(s.name for s in train),
        train=tuple(train_sets),
        val=datasets.concatenate_datasets(val_sets),
        dropped=dropped,
        val_names=tuple(s.name for s in val),
    )
