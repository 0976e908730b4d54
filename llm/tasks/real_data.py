"""Real public text for ``scalebio demo --model smollm2``: math solutions, a corrupted copy, prose.

Everything is read from installed packages; nothing is downloaded at run time.

* ``math`` (target): CHAMP competition problems (the ``champ-dataset`` wheel, MIT licence, 270
  problems in 5 categories) with their worked solutions: "Solve: <problem>" → the first solution
  steps that fit :data:`MAX_SOLUTION_CHARS`, then "Answer: <final answer>".
* ``math_shuffled`` (corrupted): the same training problems, each paired with the solution of
  another training problem (a derangement: no problem keeps its own solution). Same style, same
  vocabulary, same length distribution; only the problem → solution link is broken.
* ``prose`` (off-target): paragraphs of the Python reference documentation (stdlib
  ``pydoc_data.topics``): "Continue the documentation: <first sentence>" → the next sentences.
* ``code`` (off-target): functions of a few stdlib modules: "Write the Python function ..." → its
  source.
* ``val_math`` / ``test_math``: problems disjoint from the training ones and from each other, with
  their true solutions; ``val_math`` drives the reweighting, ``test_math`` is left for the final
  held-out evaluation (``scalebio evaluate`` with it as the validation set).

One ``numpy`` Generator per draw, seeded by ``(seed, stream)``, so a seed fixes every byte.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from scalebio.llm.tasks.demo_data import write_jsonl

CHAMP_MODULE = "champ_dataset"
CHAMP_FILE = "dataset_files/v0.json"
INSTALL_HINT = "pip install champ-dataset  (or: pip install 'scalebio[demo-real]')"
TARGET, CORRUPTED, VAL_NAME, TEST_NAME = "math", "math_shuffled", "val_math", "test_math"
OFF_TARGET = ("prose", "code")
# Math notation costs ~2 characters per SmolLM2 token: 160 characters of solution (~70 tokens) after
# a prompt of ~15-80 tokens and ~20 of chat template keep most examples inside max_length 160
# (a longer one is truncated, which cuts its answer line).
MAX_SOLUTION_CHARS = 160
MAX_PROSE_CHARS = 200
MAX_CODE_CHARS = 200
# A short system turn: without one the SmolLM2 template inserts its own, ~17 tokens longer, into
# every example, and those tokens cost as much compute as the supervised ones.
SYSTEM = "You are a helpful assistant."
# Streams fixed by purpose so that changing one draw never shifts another.
# Pure-Python stdlib modules present in every CPython build, with plenty of short functions.
CODE_MODULES = ("textwrap", "string", "heapq", "bisect", "fractions", "statistics", "shlex", "csv",
                "difflib", "calendar", "random", "functools", "fnmatch", "posixpath", "base64",
                "colorsys", "ipaddress", "glob", "copy", "pprint")
STREAMS = {"split": 0, "derangement": 1, "prose": 2, "code": 3}


class MissingPackageError(ImportError):
    """The package that ships the demo's text is not installed (the message names the pip line)."""


def champ_path() -> Path:
    """The CHAMP JSON file inside the installed ``champ-dataset`` wheel (never imported)."""
    spec = find_spec(CHAMP_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the real-text demo needs the CHAMP problems: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / CHAMP_FILE
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing from the champ-dataset install; reinstall "
                                  f"it: {INSTALL_HINT}")
    return path


def load_champ(path: str | Path | None = None) -> list[dict]:
    """CHAMP problems as ``{"id", "problem", "steps", "answer"}``, sorted by id.

    ``path``: a JSON file with CHAMP's layout (``{"problems": {id: {"_text", "_answer",
    "solution": {"steps": [{"_text"}]}}}}``); default: the installed package's.
    """
    path = Path(path) if path is not None else champ_path()
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
        rows = [{"id": key, "problem": p["_text"].strip(), "answer": p["_answer"].strip(),
                 "steps": [s["_text"].strip() for s in p["solution"]["steps"]]}
                for key, p in sorted(problems.items())]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not the CHAMP layout (problems.<id>._text/_answer/"
                         f"solution.steps[]._text): {type(e).__name__}: {e}") from e
    return [r for r in rows if r["problem"] and r["answer"] and r["steps"]]


def _clip(text: str, limit: int) -> str:
    """``text`` cut at the last space before ``limit`` characters (whole if it fits)."""
    return text if len(text) <= limit else text[: limit + 1].rsplit(" ", 1)[0] + " ..."


def solution_text(row: dict, limit: int = MAX_SOLUTION_CHARS) -> str:
    """The first whole steps that fit ``limit`` characters (at least one, clipped), the answer."""
    kept = []
    for step in row["steps"]:
        if kept and len(" ".join([*kept, step])) > limit:
            break
        kept.append(step)
    return f"{_clip(' '.join(kept), limit)}\nAnswer: {row['answer']}"


def chat_record(prompt: str, response: str) -> dict:
    """One ``messages``-format record: the short system turn, the prompt, the response."""
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": prompt},
                         {"role": "assistant", "content": response}]}


def math_record(problem: dict, solution_of: dict) -> dict:
    return chat_record(f"Solve: {problem['problem']}", solution_text(solution_of))


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` with no fixed point (``n >= 2``).

    Rejection: a uniform permutation has no fixed point with probability → 1/e, so ~2.7 draws on
    average, and the accepted one is uniform over derangements.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def split_ids(n: int, n_val: int, n_test: int, rng: np.random.Generator
              ) -> tuple[list[int], list[int], list[int]]:
    """Disjoint (train, val, test) index lists of ``range(n)``, each sorted; train gets the rest."""
    if n_val < 1 or n_test < 1 or n - n_val - n_test < 2:
        raise ValueError(f"cannot split {n} problems into val {n_val}, test {n_test} and at least "
                         "2 for training")
    perm = rng.permutation(n)
    val, test, train = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    return sorted(map(int, train)), sorted(map(int, val)), sorted(map(int, test))


def prose_pool(limit: int = MAX_PROSE_CHARS) -> list[dict]:
    """Paragraphs of the Python reference docs: first sentence → the next ones, fixed order."""
    from pydoc_data.topics import topics

    pool = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if paragraph.startswith(" ") or ">>>" in paragraph:
                continue  # indented blocks are code samples or grammar, not prose
            sentences = re.split(r"(?<=[.!?]) +", " ".join(paragraph.split()))
            if len(sentences) >= 3 and len(sentences[0]) >= 30:
                rest = _clip(" ".join(sentences[1:]), limit)
                pool.append(chat_record(f"Continue the documentation: {sentences[0]}", rest))
    return pool


def code_pool(modules: tuple[str, ...] = CODE_MODULES, limit: int = MAX_CODE_CHARS) -> list[dict]:
    """Functions and methods of stdlib ``modules``: "Write the Python function m.f(sig)" → source.

    Public top-level functions and the public methods of public top-level classes, fixed order.
    """
    pool = []
    for name in modules:
        module = importlib.import_module(name)
        found = []
        for oname, obj in sorted(vars(module).items()):
            if oname.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj):
                found.append((oname, obj))
            elif inspect.isclass(obj):
                found += [(f"{oname}.{m}", f) for m, f in sorted(vars(obj).items())
                          if inspect.isfunction(f) and not m.startswith("_")]
        for fname, fn in found:
            try:
                source, signature = inspect.getsource(fn), str(inspect.signature(fn))
            except (OSError, TypeError, ValueError):
                continue  # no source shipped, or a builtin signature
            prompt = f"Write the Python function {name}.{fname}{signature}."
            pool.append(chat_record(prompt, _clip(source.strip(), limit)))
    return pool


def _write(out: Path, name: str, records: list[dict]) -> dict:
    path = out / f"{name}.jsonl"
    write_jsonl(path, records)
    return {"name": name, "path": str(path), "format": "messages"}


def write_real_sources(out_dir: str | Path, seed: int = 0, n_val: int = 50, n_test: int = 50,
                       champ_file: str | Path | None = None) -> dict:
    """Write the real-text demo's sources, validation and test sets as ``messages`` JSONL files.

    Every training source has as many records as the target (the training problems): the
    off-target ones are drawn without replacement from their pools (with replacement if a pool is
    smaller).

    Returns:
        ``{"sources": [{"name", "path", "format"}], "val": {...}, "test": {...},
        "roles": {name: "target" | "corrupted" | "off-target"}, "counts": {name: records},
        "ids": {"train", "val", "test": [CHAMP ids]}, "derangement": [int]}``.
    """
    rows = load_champ(champ_file)
    train, val, test = split_ids(len(rows), n_val, n_test,
                                 np.random.default_rng([seed, STREAMS["split"]]))
    perm = derangement(len(train), np.random.default_rng([seed, STREAMS["derangement"]]))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = {
        TARGET: [math_record(rows[i], rows[i]) for i in train],
        CORRUPTED: [math_record(rows[i], rows[train[int(j)]]) for i, j in zip(train, perm)],
    }
    pools = {"prose": prose_pool, "code": code_pool}
    for name in OFF_TARGET:
        pool = pools[name]()
        if not pool:
            raise RuntimeError(f"the {name} pool read from the stdlib is empty")
        rng = np.random.default_rng([seed, STREAMS[name]])
        picks = rng.choice(len(pool), size=len(train), replace=len(train) > len(pool))
        records[name] = [pool[int(i)] for i in picks]
    sources = [_write(out, name, recs) for name, recs in records.items()]
    held = {VAL_NAME: val, TEST_NAME: test}
    written = {name: _write(out, name, [math_record(rows[i], rows[i]) for i in ids])
               for name, ids in held.items()}
    roles = {TARGET: "target", CORRUPTED: "corrupted"} | dict.fromkeys(OFF_TARGET, "off-target")
    return {
        "sources": sources, "val": written[VAL_NAME], "test": written[TEST_NAME], "roles": roles,
        "counts": {name: len(recs) for name, recs in records.items()} | {VAL_NAME: len(val),
                                                                         TEST_NAME: len(test)},
        "ids": {"train": [rows[i]["id"] for i in train], "val": [rows[i]["id"] for i in val],
                "test": [rows[i]["id"] for i in test]},
        "derangement": perm.tolist(),
    }
