"""Multi-source SFT data: read each source, tokenise it (llm/data/conversations.py), cache it.

A *source* is one file (``.jsonl``; ``.json``: a list of records or JSON Lines; ``.parquet``) or
one ``datasets`` save_to_disk folder, named by a :class:`SourceSpec` with a format of
:data:`FORMATS`. Mixture weights refer to sources by name, never by position. Examples left without
a supervised token after truncation are dropped, counted in :attr:`SourceData.dropped` and logged.

Scale: a source is streamed in chunks of :data:`CHUNK_RECORDS` records (a JSON list is parsed
incrementally, parquet by record batch) and each chunk is tokenised, by ``num_proc`` worker
processes when there is more than one chunk, then appended to the Arrow file in file order. At
most two chunks per worker are in flight, so memory does not grow with the size of a file.
Workers are forked from a fork server (spawned where there is none), so a script that calls
:func:`load_sources` at top level needs the usual ``if __name__ == "__main__":`` guard.

Cache: ``cache_dir/<stem>-<key>.arrow`` (Arrow stream, written to a temporary name and renamed:
concurrent ranks at worst tokenise twice) and a ``.json`` sidecar of counts. The key hashes the
absolute path, size and mtime (of every file, for a folder), format, tokenizer (backend JSON or
vocabulary, chat template, BOS/EOS, name), ``max_length`` and :data:`PIPELINE_VERSION`. A hit
memory-maps the Arrow file and neither reads the source nor calls the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import re
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
from datasets import Dataset

from scalebio.llm.data.conversations import (
    FORMATS,
    IGNORE_INDEX,
    DataError,
    Encoder,
    to_messages,
    tokenise_examples,
)

__all__ = ["CHUNK_RECORDS", "FORMATS", "IGNORE_INDEX", "PIPELINE_VERSION", "DataError",
           "SourceData", "SourceSpec", "default_num_proc", "load_sources", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump whenever tokenisation changes: it is part of every cache key
CHUNK_RECORDS = 1024  # records per task: large enough to amortise a task, small enough for memory
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


# ---------------------------------------------------------------- reading, streamed

_BLOCK = 1 << 20  # characters read at a time from a JSON list
_MAX_RECORD = 1 << 26  # a JSON list record that still fails to parse at this size is malformed
_ROWS = 1024  # rows per parquet / save_to_disk batch


def _table_rows(path: Path) -> Iterator[dict]:
    """Rows of a parquet file or of a save_to_disk folder, a batch at a time."""
    if path.is_file():
        import pyarrow.parquet as pq

        try:  # pyarrow raises several types; all mean "not a parquet file"
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROWS):
                yield from batch.to_pylist()
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        return
    if (path / "dataset_dict.json").exists():
        raise DataError(f"{path}: a DatasetDict folder; point the source at one split folder")
    if not (path / "state.json").exists():
        raise DataError(f"{path}: a folder source must be a `datasets` save_to_disk folder")
    for batch in datasets.load_from_disk(str(path)).iter(batch_size=_ROWS):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _json_list(path: Path) -> Iterator[Any]:
    """The records of a file holding one JSON list, parsed one at a time from a bounded buffer."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, line, eof = "", 0, 1, False  # line: the line number of buf[0]

        def fill() -> None:
            nonlocal buf, pos, line, eof
            line += buf.count("\n", 0, pos)
            block = f.read(_BLOCK)
            buf, pos, eof = buf[pos:] + block, 0, not block

        def skip_space() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        def fail(msg: str, at: int) -> DataError:
            return DataError(f"{path}:{line + buf.count(chr(10), 0, at)}: malformed JSON ({msg})")

        skip_space()  # the caller saw "[" first
        pos += 1
        skip_space()
        if buf[pos:pos + 1] == "]":
            pos += 1
        else:
            while True:
                skip_space()
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # a number cut at the end of the buffer would decode short: read on
                    if end == len(buf) and not eof:
                        raise json.JSONDecodeError("cut", buf, end)
                except json.JSONDecodeError as e:
                    if eof or len(buf) - pos > _MAX_RECORD:  # malformed, not just cut short
                        raise fail(e.msg, e.pos) from e
                    fill()
                    continue
                pos = end
                yield value
                skip_space()
                sep = buf[pos:pos + 1]
                if sep not in (",", "]"):
                    raise fail("expecting ',' delimiter" if sep else "unterminated list", pos)
                pos += 1
                if sep == "]":
                    break
        skip_space()
        if pos < len(buf):
            raise fail("extra data", pos)


def read_items(path: Path) -> Iterator[tuple[str, bool, Any, str]]:
    """Yield (location, raw, value, hint) in file order: ``raw`` values are JSON lines still to be
    parsed (an error names ``location`` and adds ``hint``), others are records already."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        yield from ((f"{path}: row {i}", False, row, "") for i, row in enumerate(_table_rows(path)))
        return
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if suffix == ".json" and head.startswith("["):
        yield from ((f"{path}: record {i}", False, r, "") for i, r in enumerate(_json_list(path)))
        return
    hint = " (.json holds a list of records or one record per line)" if suffix == ".json" else ""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", True, line, hint


def _read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) in file order; the location names the file and line/record/row."""
    for loc, raw, value, hint in read_items(path):
        yield loc, _parse(loc, raw, value, hint)


def _parse(loc: str, raw: bool, value: Any, hint: str) -> Any:
    if not raw:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{loc}: malformed JSON line ({e.msg}){hint}") from e


# ---------------------------------------------------------------- tokenising chunks


def _tokenise_chunk(encoder: Encoder, task: tuple) -> dict[str, Any]:
    """One chunk: parse (JSON lines are parsed here, in the worker), normalise, tokenise."""
    fmt, max_length, locs, raw, values, hint = task
    messages = [to_messages(_parse(loc, raw, v, hint), fmt, loc) for loc, v in zip(locs, values)]
    out = tokenise_examples(encoder, messages, locs, max_length)
    out["fallbacks"] = list(encoder.fallbacks)
    return out


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_ENCODER
    # one process per core already: a Rust thread pool in every worker would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = Encoder(tokenizer)


def _work(task: tuple) -> dict[str, Any]:
    return _tokenise_chunk(_WORKER_ENCODER, task)


def default_num_proc() -> int:
    """min(4, usable cores): beyond a few processes the Arrow writer and reader become the limit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


def _mp_context() -> multiprocessing.context.BaseContext:
    """Not fork: the caller may hold torch or tokenizer threads, and a forked child can deadlock.
    A fork server imports this module once, then forks workers from a single-threaded process;
    spawn (a fresh interpreter per worker, each importing torch and transformers) is the fallback.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # no effect once a fork server runs: speed only
    return ctx


class _Runner:
    """Tokenises chunks in order: inline for a one-chunk source, else by a process pool that is
    started on first need and shared by the sources of one :func:`load_sources` call."""

    def __init__(self, tokenizer: Any, num_proc: int) -> None:
        self.tokenizer, self.num_proc = tokenizer, num_proc
        self.encoder = Encoder(tokenizer)
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor | None:
        if self._pool is None and self.num_proc > 1:
            try:
                pickle.dumps(self.tokenizer)
            except Exception as e:  # workers receive the tokenizer pickled
                log.warning("tokenizer cannot be pickled (%s): tokenising in one process", e)
                self.num_proc = 1
                return None
            self._pool = ProcessPoolExecutor(self.num_proc, mp_context=_mp_context(),
                                             initializer=_init_worker, initargs=(self.tokenizer,))
        return self._pool

    def map(self, tasks: Iterator[tuple]) -> Iterator[dict[str, Any]]:
        """Results in task order. An error of the reader is raised only after every task read
        before it is done, so the first bad record in file order is the one reported."""
        errors: list[DataError] = []
        pending: deque = deque()  # futures of the pool, or tasks to run inline
        try:
            for task in _until_error(tasks, errors):
                if pending and self._pool is None and self._start() is not None:
                    pending = deque(self._pool.submit(_work, t) for t in pending)
                if self._pool is None:  # one task of look-ahead: a one-chunk source stays inline
                    if pending:
                        yield _tokenise_chunk(self.encoder, pending.popleft())
                    pending.append(task)
                    continue
                pending.append(self._pool.submit(_work, task))
                if len(pending) >= 2 * self.num_proc:
                    yield pending.popleft().result()
            while pending:
                item = pending.popleft()
                yield item.result() if isinstance(item, Future) else _tokenise_chunk(
                    self.encoder, item)
        finally:
            for item in pending:
                if isinstance(item, Future):
                    item.cancel()
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _until_error(tasks: Iterator[tuple], errors: list[DataError]) -> Iterator[tuple]:
    """``tasks`` until the first DataError, which is appended to ``errors`` instead of raised."""
    while True:
        try:
            task = next(tasks)
        except StopIteration:
            return
        except DataError as e:
            errors.append(e)
            return
        yield task


def _tasks(path: Path, fmt: str, max_length: int) -> Iterator[tuple]:
    locs: list[str] = []
    values: list[Any] = []
    raw, hint = False, ""
    for loc, raw, value, hint in read_items(path):
        locs.append(loc)
        values.append(value)
        if len(locs) == CHUNK_RECORDS:
            yield fmt, max_length, locs, raw, values, hint
            locs, values = [], []
    if locs:
        yield fmt, max_length, locs, raw, values, hint


def _record_batch(out: dict[str, Any]) -> pa.RecordBatch:
    offsets = pa.array(np.concatenate([[0], np.cumsum(out["lengths"])]).astype(np.int32))
    return pa.RecordBatch.from_arrays(
        [pa.ListArray.from_arrays(offsets, pa.array(out["input_ids"])),
         pa.ListArray.from_arrays(offsets, pa.array(out["labels"])),
         pa.array(out["n_target"])],
        schema=_FEATURES.arrow_schema)


def _write_arrow(spec: SourceSpec, path: Path, max_length: int, runner: _Runner,
                 arrow: Path) -> dict[str, int]:
    """Tokenise ``path`` chunk by chunk into the Arrow file ``arrow``; return the counts."""
    info = {"records": 0, "dropped": 0, "inexact_boundaries": 0}
    fallbacks: set[str] = set()
    tmp = arrow.with_name(f"{arrow.name}.{uuid.uuid4().hex}.tmp")  # unique across hosts too
    t0 = time.perf_counter()
    try:
        with pa.OSFile(str(tmp), "wb") as sink, \
                pa.ipc.new_stream(sink, _FEATURES.arrow_schema) as writer:
            for out in runner.map(_tasks(path, spec.format, max_length)):
                info["records"] += out["records"]
                info["dropped"] += out["dropped"]
                info["inexact_boundaries"] += out["inexact"]
                fallbacks.update(out["fallbacks"])
                if len(out["lengths"]):
                    writer.write_batch(_record_batch(out))
        if not info["records"]:
            raise DataError(f"{path}: source {spec.name!r} is empty (no records)")
        os.replace(tmp, arrow)  # atomic: a reader sees the whole file or none
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    log.info("source %r: tokenised %d records in %.1f s (%.0f records/s)", spec.name,
             info["records"], seconds, info["records"] / max(seconds, 1e-9))
    if fallbacks:
        log.info("source %r: the %s differed from the reference call; used the "
                 "reference (slower)", spec.name, " and ".join(sorted(fallbacks)))
    return info


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


def _load_one(spec: SourceSpec, runner: _Runner, tok_key: str, max_length: int,
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
        log.info("source %r: %d examples from cache %s", spec.name,
                 info["records"] - info["dropped"], arrow)
    else:
        info = _write_arrow(spec, path, max_length, runner, arrow)
        tmp = meta.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, meta)  # atomic: a reader sees the whole sidecar or none
        if info["inexact_boundaries"]:
            log.warning("source %r: %d response boundaries fall inside a token "
                        "(llm/data/conversations.py)", spec.name, info["inexact_boundaries"])
    ds = Dataset.from_file(str(arrow))
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
                 max_length: int, cache_dir: str | os.PathLike,
                 num_proc: int | None = None) -> SourceData:
    """Read, normalise, tokenise (or load from cache) the training sources and the validation set.

    Args:
      train: one spec per training source; names must be unique and are the mixture's keys.
      val: one or more validation specs, concatenated into one validation set.
      tokenizer: a Hugging Face tokenizer (chat template used when present).
      max_length: truncation length in tokens (≥ 2, so that one target survives the shift).
      cache_dir: folder for the Arrow caches (created if missing).
      num_proc: tokenising processes for sources of more than one chunk; ``None`` means
        :func:`default_num_proc`, 1 tokenises in this process. The result does not depend on it.

    Returns:
      :class:`SourceData`. Raises :class:`DataError` naming the file and line/field on bad input.
    """
    _check_specs(train, "train")
    _check_specs(val, "val")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise DataError(f"max_length: an integer >= 2 is required, got {max_length!r}")
    if num_proc is None:
        num_proc = default_num_proc()
    if not isinstance(num_proc, int) or isinstance(num_proc, bool) or num_proc < 1:
        raise DataError(f"num_proc: a positive integer (or None) is required, got {num_proc!r}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tok_key = tokenizer_fingerprint(tokenizer)
    dropped: dict[str, int] = {}
    train_sets, val_sets = [], []
    runner = _Runner(tokenizer, num_proc)
    try:
        for spec in train:
            ds, dropped[spec.name] = _load_one(spec, runner, tok_key, max_length, cache)
            train_sets.append(ds)
        for k, spec in enumerate(val):
            ds, dropped[f"val:{spec.name}"] = _load_one(spec, runner, tok_key, max_length, cache)
            val_sets.append(ds.add_column("source", np.full(len(ds), k, np.int64)))
    finally:
        runner.close()
    return SourceData(
        names=tuple(s.name for s in train),
        train=tuple(train_sets),
        val=datasets.concatenate_datasets(val_sets),
        dropped=dropped,
        val_names=tuple(s.name for s in val),
    )
