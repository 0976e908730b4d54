"""The folder ``scalebio mix`` writes (llm/pipeline/mix.py), and its ready-to-paste trainer configs.

The folder is built beside ``out`` and renamed into place, so a reader sees all of it or none.
Snippets: each trainer (TRL, LlamaFactory, axolotl) gets the produced ``mixture.jsonl`` (exactly
the drawn rows, in ``messages`` format). TRL and LlamaFactory also get an on-the-fly variant that
interleaves the original sources with the learned weights. Sources of weight 0 are left out of
those variants: with an "oversample until every source is exhausted" strategy, a source that is
never drawn would never be exhausted. Paths are absolute, as they were when written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from pprint import pformat

import yaml

from scalebio.llm.data.sources import SourceSpec

__all__ = ["held_out_file", "publish", "render_snippets", "sha256_of", "write_mixture"]

MIXTURE_NAME = "scalebio_mixture"  # the LlamaFactory dataset_info key of the mixture itself
_OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                "assistant_tag": "assistant", "system_tag": "system"}
_SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                  "assistant_tag": "gpt", "system_tag": "system"}
# `datasets` loaders by file type; save_to_disk folders are read with load_from_disk ("disk").
_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _loader(spec: SourceSpec) -> str:
    return "disk" if Path(spec.path).is_dir() else _LOADERS[Path(spec.path).suffix.lower()]


def _llamafactory_entry(spec: SourceSpec) -> dict:
    """A dataset_info.json entry that reads the source in its own format."""
    if spec.format == "alpaca":
        return {"file_name": spec.path,
                "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    column, tags = ("conversations", _SHAREGPT_TAGS) if spec.format == "sharegpt" else (
        "messages", _OPENAI_TAGS)
    return {"file_name": spec.path, "formatting": "sharegpt", "columns": {"messages": column},
            "tags": dict(tags)}


def _positive(specs: list[SourceSpec], probs: list[float]) -> tuple[list[SourceSpec], list[float]]:
    """The sources of positive weight, with their weights renormalised to sum to 1."""
    kept = [(s, p) for s, p in zip(specs, probs) if p > 0]
    total = sum(p for _, p in kept)
    return [s for s, _ in kept], [p / total for _, p in kept]


def _trl(out: Path, specs: list[SourceSpec], probs: list[float], manifest: dict) -> str:
    rows = "".join(f"    ({s.name!r}, {_loader(s)!r}, {s.path!r}, {s.format!r}),\n" for s in specs)
    return f'''"""TRL SFTTrainer data, written by `scalebio mix` (seed {manifest["seed"]}).

`train_dataset`: the {manifest["num_examples_written"]} drawn rows of mixture.jsonl, shuffled, as
"messages" conversations, which SFTTrainer renders with the model's chat template:
    trainer = SFTTrainer(model=..., train_dataset=train_dataset, ...)
`interleaved()`: the original sources mixed on the fly with the learned weights instead
(datasets.interleave_datasets; needs scalebio installed to read the source formats).
"""

from datasets import interleave_datasets, load_dataset, load_from_disk

MIXTURE = {str(out / "mixture.jsonl")!r}
SOURCES = [  # (name, loader, path, format) of every source with a positive weight
{rows}]
PROBABILITIES = {pformat(probs, width=96)}

train_dataset = load_dataset("json", data_files=MIXTURE, split="train").remove_columns("source")


def interleaved(seed={manifest["seed"]}, stopping_strategy="all_exhausted"):
    """The sources as "messages" rows, drawn with PROBABILITIES."""
    from scalebio.llm.data.conversations import to_messages

    parts = []
    for name, loader, path, fmt in SOURCES:
        if loader == "disk":
            ds = load_from_disk(path)
        else:
            ds = load_dataset(loader, data_files=path, split="train")
        parts.append(ds.map(lambda r, f=fmt, n=name: {{"messages": to_messages(dict(r), f, n)}},
                            remove_columns=ds.column_names))
    return interleave_datasets(parts, probabilities=PROBABILITIES, seed=seed,
                               stopping_strategy=stopping_strategy)
'''


def _yaml(header: str, body: dict) -> str:
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def render_snippets(out: Path, specs: list[SourceSpec], probs: list[float],
                    manifest: dict) -> dict[str, str]:
    """Snippet files (path relative to ``out/snippets`` → text) for the mixture in ``out``.

    Args:
      out: the final (absolute) output folder of the mixture.
      specs: the sources, in config order.
      probs: their weights, same order.
      manifest: the mixture's manifest (seed, rows written, when_short).
    """
    mixture = str(out / "mixture.jsonl")
    kept, kept_probs = _positive(specs, probs)
    lf_dir = str(out / "snippets" / "llamafactory")
    info = {MIXTURE_NAME: {"file_name": mixture, "formatting": "sharegpt",
                           "columns": {"messages": "messages"}, "tags": dict(_OPENAI_TAGS)}}
    info.update({s.name: _llamafactory_entry(s) for s in specs})
    folders = [s.name for s in kept if _loader(s) == "disk"]
    note = (f"\nLlamaFactory cannot read save_to_disk folders ({', '.join(folders)}): use "
            f"{MIXTURE_NAME} (mixture.yaml) instead." if folders else "")
    strategy = "interleave_over" if manifest["when_short"] == "upsample" else "interleave_under"
    n = manifest["num_examples_written"]
    return {
        "trl_sft.py": _trl(out, kept, kept_probs, manifest),
        "llamafactory/dataset_info.json": json.dumps(info, indent=2, ensure_ascii=False) + "\n",
        "llamafactory/mixture.yaml": _yaml(
            f"LlamaFactory training arguments (merge into your config): the {n} rows drawn by\n"
            "`scalebio mix`, already shuffled.",
            {"dataset_dir": lf_dir, "dataset": MIXTURE_NAME},
        ),
        "llamafactory/interleave.yaml": _yaml(
            "LlamaFactory training arguments: the original sources mixed on the fly with the\n"
            "learned weights. interleave_under stops when the first source runs out;\n"
            "interleave_over oversamples until every source has been seen." + note,
            {"dataset_dir": lf_dir, "dataset": ",".join(s.name for s in kept),
             "mix_strategy": strategy, "interleave_probs": ",".join(map(repr, kept_probs)),
             "seed": manifest["seed"]},
        ),
        "axolotl.yaml": _yaml(
            f"axolotl `datasets:` entry: the {n} rows drawn by `scalebio mix`, shuffled, with the\n"
            "learned weights already applied (axolotl has no per-dataset sampling weights).",
            {"datasets": [{"path": mixture, "ds_type": "json", "type": "chat_template",
                           "field_messages": "messages",
                           "message_property_mappings": {"role": "role", "content": "content"}}]},
        ),
    }


def sha256_of(path: Path) -> str:
    """Hash of a file, or of a folder's (relative path, bytes) pairs in sorted order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():  # the name is hashed too, so renaming a shard changes the hash
            h.update(str(f.relative_to(path)).encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder onto ``out``. Without ``overwrite`` this is one rename,
    which the OS refuses (OSError) if ``out`` has gained content meanwhile; with it, the old
    folder is renamed aside first and deleted after."""
    if overwrite and out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def held_out_file(index: int, name: str) -> str:
    """``held_out/003-<name>.jsonl``: the index keeps names that sanitise alike apart."""
    return f"held_out/{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.jsonl"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_mixture(out: Path, rows: list[dict], manifest: dict, specs: list[SourceSpec],
                  probs: list[float], overwrite: bool, progress: bool,
                  held_out: dict[str, list[dict]]) -> None:
    """Write ``mixture.jsonl``, ``dataset/``, ``snippets/``, ``held_out/`` and ``manifest.json``
    (which gains ``mixture_sha256``, ``snippets`` and ``held_out``: per source name, the file
    relative to ``out`` and its record count) into a temporary folder beside ``out``, then
    :func:`publish` it; a failure leaves ``out`` as it was and no temporary folder behind."""
    import datasets

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    bars_were_on = datasets.is_progress_bar_enabled()
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        jsonl = _jsonl(rows)
        (tmp / "mixture.jsonl").write_bytes(jsonl)
        (tmp / "held_out").mkdir()
        manifest["held_out"] = {}
        for i, spec in enumerate(specs):
            rel = held_out_file(i, spec.name)
            (tmp / rel).write_bytes(_jsonl(held_out[spec.name]))
            manifest["held_out"][spec.name] = {"path": rel, "records": len(held_out[spec.name])}
        if not progress:
            datasets.disable_progress_bars()
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "dataset"))
        manifest["mixture_sha256"] = hashlib.sha256(jsonl).hexdigest()
        snippets = render_snippets(out, specs, probs, manifest)
        manifest["snippets"] = sorted(snippets)
        for rel, text in snippets.items():
            (tmp / "snippets" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "snippets" / rel).write_text(text, encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        publish(tmp, out, overwrite)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
