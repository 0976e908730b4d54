"""Data problems that a run would otherwise accept silently, or report with the wrong cause.

Errors (:class:`DataError`, one line naming the file):

* a byte that is not UTF-8 (file and line: :func:`locate_undecodable`);
* a source or validation file whose every response is empty (only the end-of-text token would be
  learned);
* a source left with no example because its records have no assistant turn (said as such, not
  blamed on truncation: :func:`diagnosed`).

Warnings (logged, the run goes on): some records without an assistant turn or with an empty
response; target tokens that are the tokenizer's unknown token (characters it cannot encode);
**leakage**, i.e. validation examples that also appear in a training source (a validation file
identical to a source is the extreme case) and a source contained in another (the same file
listed twice); a stratified source with fewer usable examples than ``data.per_source`` (every
step repeats some of them).

Examples are compared by their token ids (what the model sees), hashed per row with a
polynomial hash over 64-bit integers, vectorised over the Arrow columns, so the cost is a pass
over the tokens (no Python loop per example). Two different examples share a hash with
probability about n²/2⁶⁴: negligible for counting overlaps.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from scalebio.llm.data.conversations import IGNORE_INDEX, DataError, to_messages
from scalebio.llm.data.sources import SourceData, SourceSpec, _read_records

log = logging.getLogger(__name__)

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial hash
_LEN_MIX = np.uint64(0xC2B2AE3D27D4EB4F)  # mixes the length in, so a prefix hashes apart


def locate_undecodable(specs: list[SourceSpec]) -> DataError | None:
    """The first line of a JSON/JSONL file among ``specs`` that is not UTF-8, as a DataError."""
    for spec in specs:
        path = Path(spec.path)
        if not (path.is_file() and path.suffix.lower() in (".json", ".jsonl")):
            continue
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return DataError(f"{path}:{lineno}: not UTF-8 text (byte {line[e.start]:#04x} "
                                     f"at byte {e.start + 1} of the line); save the file as "
                                     "UTF-8")
    return None


def read_all(specs: list[SourceSpec]) -> None:
    """Read and normalise every record of ``specs``, as a run would (for a command that needs
    no tokens but must not accept a broken file)."""
    for spec in specs:
        path = Path(spec.path)
        if not path.exists():
            raise DataError(f"{path}: source {spec.name!r}: no such file or folder")
        with diagnosed([spec], max_length=0):
            n = 0
            for loc, record in _read_records(path):
                to_messages(record, spec.format, loc)
                n += 1
        if n == 0:
            raise DataError(f"{path}: source {spec.name!r} is empty (no records)")


def _no_assistant(spec: SourceSpec) -> tuple[int, int, str | None]:
    """(records, records without an assistant turn, location of the first such record)."""
    n = bad = 0
    first = None
    for loc, record in _read_records(Path(spec.path)):
        n += 1
        if not any(m["role"] == "assistant" for m in to_messages(record, spec.format, loc)):
            bad += 1
            first = first or loc
    return n, bad, first


@contextlib.contextmanager
def diagnosed(specs: list[SourceSpec], max_length: int):
    """Around :func:`load_sources`: a decoding error becomes a DataError naming file and line,
    and a source without usable examples says whether its records lack an assistant turn."""
    try:
        yield
    except UnicodeDecodeError:
        found = locate_undecodable(specs)
        if found is None:
            raise
        raise found from None
    except DataError as e:
        if "has no usable example" not in str(e):
            raise
        spec = next((s for s in specs if str(e).startswith(str(Path(s.path).resolve()))), None)
        if spec is None:
            raise
        n, bad, first = _no_assistant(spec)
        if bad == n:
            raise DataError(f"{spec.path}: source {spec.name!r}: no record has an assistant turn "
                            f"(first: {first}); every example needs a response to learn") from None
        if bad:
            raise DataError(f"{spec.path}: source {spec.name!r}: {bad} of {n} records have no "
                            f"assistant turn (first: {first}) and the other {n - bad} have no "
                            f"response token left after truncation to max_length={max_length}"
                            ) from None
        raise


def _rows(ds, column: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(offsets relative to the values, values) per Arrow chunk of a list column."""
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    out = []
    for chunk in ds.data.column(column).chunks:
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        lo, hi = int(offsets[0]), int(offsets[-1])
        out.append((offsets - lo, chunk.values.to_numpy()[lo:hi]))
    return out


def _row_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-row sums of ``values`` split at ``offsets``, by differences of a running sum (exact
    in int64; modulo 2^64 in uint64, which is what the hash wants)."""
    running = np.concatenate([np.zeros(1, dtype=values.dtype),
                              np.cumsum(values, dtype=values.dtype)])
    return running[offsets[1:]] - running[offsets[:-1]]


def row_hashes(ds) -> np.ndarray:
    """A 64-bit hash of each example's ``input_ids`` (uint64, one per row)."""
    parts = []
    for offsets, values in _rows(ds, "input_ids"):
        lengths = np.diff(offsets)
        if not len(lengths):
            continue
        powers = np.cumprod(np.full(int(lengths.max()) + 1, _MULT, dtype=np.uint64))
        pos = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
        terms = (values.astype(np.uint64) + np.uint64(1)) * powers[pos]
        parts.append(_row_sums(terms, offsets) ^ (lengths.astype(np.uint64) * _LEN_MIX))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _frame_ids(tokenizer: Any) -> set[int]:
    """Token ids the chat template supervises around any response (end of turn, end of text):
    those of an example whose response is empty, tokenised by the pipeline itself."""
    from scalebio.llm.data.conversations import Encoder, tokenise_examples

    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]
    try:
        out = tokenise_examples(Encoder(tokenizer), [probe], ["empty-response probe"], 1 << 16)
    except Exception:  # a template that cannot render it: the special tokens alone
        return set()
    return {int(t) for t in np.asarray(out["labels"]).ravel() if t != IGNORE_INDEX}


def target_stats(ds, tokenizer: Any) -> tuple[int, int, int]:
    """(examples, examples whose supervised tokens are all special tokens or the template's
    end-of-turn tokens: an empty response, supervised tokens that are the unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    frame = (set(tokenizer.all_special_ids) | _frame_ids(tokenizer)) - {unk}
    special = np.array(sorted(frame), dtype=np.int64)
    n = empty = unknown = 0
    for offsets, labels in _rows(ds, "labels"):
        lengths = np.diff(offsets)
        real = (labels != IGNORE_INDEX) & ~np.isin(labels, special)
        per_row = _row_sums(real.astype(np.int64), offsets)
        n, empty = n + len(lengths), empty + int((per_row == 0).sum())
        if unk is not None:
            unknown += int((labels == unk).sum())
    return n, empty, unknown


def _check_targets(spec: SourceSpec, ds, tokenizer: Any, role: str) -> None:
    n, empty, unknown = target_stats(ds, tokenizer)
    what = f"{spec.path}: {role} {spec.name!r}"
    if n and empty == n:
        raise DataError(f"{what}: every response is empty ({n} examples): only the end-of-text "
                        "token would be learned")
    if empty:
        log.warning("%s: %d of %d examples have an empty response", what, empty, n)
    if unknown:
        log.warning("%s: %d target tokens are the tokenizer's unknown token %r (characters it "
                    "cannot encode)", what, unknown, getattr(tokenizer, "unk_token", None))


def check_data(data: SourceData, train: list[SourceSpec], val: list[SourceSpec], tokenizer: Any,
               per_source: int | None = None) -> None:
    """The checks of the module docstring on loaded data (``per_source``: the stratified quota,
    None for pooled batches)."""
    for spec, ds in zip(train, data.train):
        _check_targets(spec, ds, tokenizer, "source")
        if data.dropped.get(spec.name):
            _warn_no_assistant(spec)
        if per_source is not None and len(ds) < per_source:
            log.warning("source %r has %d usable example(s) but data.per_source is %d: every "
                        "step repeats its examples", spec.name, len(ds), per_source)
    val_ids = np.asarray(data.val["source"], dtype=np.int64)
    for k, spec in enumerate(val):
        _check_targets(spec, data.val.select(np.flatnonzero(val_ids == k)), tokenizer,
                       "validation file")
    _check_overlaps(data, train, val, val_ids)


def _warn_no_assistant(spec: SourceSpec) -> None:
    n, bad, first = _no_assistant(spec)
    if bad:
        log.warning("%s: source %r: %d of %d records have no assistant turn (first: %s) and are "
                    "skipped", spec.path, spec.name, bad, n, first)


def _check_overlaps(data: SourceData, train: list[SourceSpec], val: list[SourceSpec],
                    val_ids: np.ndarray) -> None:
    """Leakage (validation in training) and a source contained in another."""
    hashes = [row_hashes(ds) for ds in data.train]
    val_hashes = row_hashes(data.val)
    for k, vspec in enumerate(val):
        mine = val_hashes[val_ids == k]
        for spec, h in zip(train, hashes):
            shared = int(np.isin(mine, h).sum())
            if shared:
                same = " (the same file)" if _same(vspec, spec) else ""
                log.warning("leakage: %d of %d examples of validation file %s also appear in "
                            "training source %r%s", shared, len(mine), vspec.path, spec.name, same)
    for i in range(len(train)):
        for j in range(i + 1, len(train)):
            a, b = hashes[i], hashes[j]
            small, big, name = (b, a, train[j].name) if len(b) <= len(a) else (a, b, train[i].name)
            if _same(train[i], train[j]) or (len(small) and np.isin(small, big).all()):
                log.warning("sources %r and %r: every example of %r is also in the other%s; the "
                            "mixture weights cannot tell them apart", train[i].name,
                            train[j].name, name, " (the same file)" if _same(train[i], train[j])
                            else "")


def _same(a: SourceSpec, b: SourceSpec) -> bool:
    return Path(a.path).resolve() == Path(b.path).resolve()
