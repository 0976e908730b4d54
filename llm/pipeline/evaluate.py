"""``scalebio evaluate``: loss per source, loss on the target validation set, answer accuracy.

Sets evaluated (all read and tokenised by :func:`load_sources`, as reweight and sft read them):

* every ``data.sources`` entry of the config, and every ``data.validation`` file (each on its own,
  plus all together as ``validation``). Per source, either **the file the config names** (rows
  that ``scalebio mix`` drew for training are among them: a measure of fit) or, with
  ``held_out=MIX_DIR``, **the records that mixture did not draw** (``MIX_DIR/held_out/``, see
  llm/pipeline/mix.py): a held-out loss. The held-out split must belong to the same bytes: a
  source whose
  file changed since the mix (sha256 in its manifest) is refused, and a source every record of
  which is in the mixture (up-sampled) is skipped and listed under ``skipped``. At most
  ``max_examples`` examples per set are used, drawn without replacement by ``torch.randperm``
  under a Generator seeded with ``seed``.

Loss: token-mean cross-entropy over the supervised (response) tokens of the chosen examples,
L = Σ_i Σ_t CE_it / Σ_i n_i, computed with :func:`losses.val_partial_sum`.

Accuracy, for examples with a checkable final answer (:func:`reference_number`: a response that is
one number, or ends with ``#### <number>``): greedy ``model.generate`` from the prompt (the
conversation up to its last assistant turn, rendered with the generation prompt); an answer is
correct when the first number in the generated text (:func:`first_number`) equals the reference
number exactly (as decimals: ``95`` = ``95.0``). The chosen records are drawn from the raw records
(before the dropping of over-long examples), so they may differ from the loss examples.

Outputs: ``out/results.json`` (schema in :func:`evaluate`) and a printed table
(:func:`format_table`).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scalebio.llm import outputs, preflight, run_folder
from scalebio.llm.config import Config
from scalebio.llm.data import checks
from scalebio.llm.data.batching import collate
from scalebio.llm.data.conversations import render, to_messages
from scalebio.llm.data.sources import (  # the reader reweight uses
    SourceSpec,
    _read_records,
    load_sources,
)
from scalebio.llm.loop.losses import val_partial_sum
from scalebio.llm.model import load_model
from scalebio.llm.pipeline.mix_outputs import sha256_of

# A number: optional sign, digits with optional thousands separators, optional decimals.
NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")


def _to_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def first_number(text: str) -> Decimal | None:
    """The first number in ``text`` (``"it is 1,234."`` -> 1234), or None if there is none."""
    m = NUMBER.search(text)
    return None if m is None else _to_decimal(m.group())


def reference_number(answer: str) -> Decimal | None:
    """The checkable final answer of a reference response, or None if it has none.

    ``"95"`` -> 95; ``"... #### 72"`` (GSM8K style) -> 72; anything else (prose, ``"abc"``,
    ``"95 apples"``) -> None.
    """
    if "####" in answer:
        return first_number(answer.rsplit("####", 1)[1])
    text = answer.strip()
    return _to_decimal(text) if NUMBER.fullmatch(text) else None


def _subset(n: int, max_examples: int, seed: int) -> list[int]:
    if n <= max_examples:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_examples].tolist())


@torch.no_grad()
def token_mean_loss(model, rows: dict, pad_token_id: int, batch_size: int, device) -> float:
    """Σ token CE / Σ supervised targets over ``rows`` (``input_ids``/``labels``/``n_target``)."""
    total = int(sum(rows["n_target"]))
    loss = 0.0
    for s in range(0, len(rows["input_ids"]), batch_size):
        part = {k: rows[k][s: s + batch_size] for k in ("input_ids", "labels")}
        mb = collate(part, torch.zeros(len(part["input_ids"])), pad_token_id)
        logits = model(input_ids=mb["input_ids"].to(device),
                       attention_mask=mb["attention_mask"].to(device)).logits
        loss += float(val_partial_sum(logits, mb["labels"].to(device), total))
    return loss


@torch.no_grad()
def answer_accuracy(model, tokenizer, spec: SourceSpec, max_examples: int, seed: int,
                    max_new_tokens: int, device) -> dict:
    """Greedy-generation accuracy on ``spec``'s checkable examples (module docstring)."""
    records = [to_messages(r, spec.format, loc) for loc, r in _read_records(Path(spec.path))]
    prompts: dict[int, list[tuple[list[int], Decimal]]] = {}  # grouped by length: no padding
    for i in _subset(len(records), max_examples, seed):
        msgs = records[i]
        last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        ref = None if last is None else reference_number(msgs[last]["content"])
        if ref is None:
            continue
        ids = tokenizer(render(tokenizer, msgs[:last], True), add_special_tokens=False)
        prompts.setdefault(len(ids["input_ids"]), []).append((ids["input_ids"], ref))
    correct = checkable = 0
    for length, group in prompts.items():
        ids = torch.tensor([g[0] for g in group], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for row, (_, ref) in zip(gen[:, length:], group):
            pred = first_number(tokenizer.decode(row.tolist(), skip_special_tokens=True))
            correct += int(pred is not None and pred == ref)
            checkable += 1
    return {"checkable": checkable, "correct": correct,
            "accuracy": correct / checkable if checkable else None}


def held_out_specs(mix_dir: str | Path, specs: list[SourceSpec]
                   ) -> tuple[list[SourceSpec], dict[str, str]]:
    """The config's sources with each file replaced by its held-out split in ``mix_dir``.

    Returns (specs that have held-out records, {skipped source: reason}). Raises ValueError naming
    the manifest when the folder is not a mixture, lacks a source of the config, or a source file
    changed since the mixture was drawn.
    """
    folder = Path(mix_dir)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"--held-out {folder}: no manifest.json (not a `scalebio mix` "
                                "output folder)")
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--held-out {manifest}: not valid JSON ({e}); re-run scalebio mix") \
            from None
    table = doc.get("held_out") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"--held-out {manifest}: no 'held_out' entry (re-run scalebio mix)")
    hashes = {e["name"]: e["sha256"] for e in doc.get("sources", [])}
    kept, skipped = [], {}
    for spec in specs:
        if spec.name not in table:
            raise ValueError(f"--held-out {manifest}: source {spec.name!r} of the config is not "
                             f"in this mixture (it has {sorted(table)})")
        if sha256_of(Path(spec.path)) != hashes.get(spec.name):
            raise ValueError(f"--held-out {manifest}: source {spec.name!r}: {spec.path} changed "
                             "since the mixture was drawn (sha256 differs), so its held-out "
                             "split no longer matches it")
        if table[spec.name]["records"] == 0:
            skipped[spec.name] = "every record is in the mixture: no held-out records"
            continue
        kept.append(SourceSpec(spec.name, str(folder / table[spec.name]["path"]), "messages"))
    return kept, skipped


def _rows(ds, idx: list[int]) -> dict:
    part = ds[idx]
    return {k: part[k] for k in ("input_ids", "labels", "n_target")}


def evaluate(model_dir: str | Path, cfg: Config, out: Path, *, max_examples: int = 200,
             max_new_tokens: int = 16, batch_size: int = 16, seed: int = 0,
             held_out: str | Path | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Evaluate the model in ``model_dir`` on ``cfg``'s sources and validation files.

    ``held_out``: a ``scalebio mix`` output folder; the sources are then scored on the records
    that mixture did not draw (module docstring).

    Returns (and writes to ``out/results.json``)::

      {"model": str, "max_examples": int, "seed": int, "max_new_tokens": int,
       "held_out": str | None, "skipped": {source: reason},
       "sets": [{"name", "role": "source" | "validation" | "validation_all", "loss",
                 "tokens", "examples", "checkable", "correct", "accuracy" (None if none)}, ...]}
    """
    folder = Path(model_dir)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise FileNotFoundError(f"--model {folder}: not a saved model folder (no config.json)")
    if max_examples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_examples, max_new_tokens and batch_size must be >= 1")
    # everything that needs no data is checked before the output folder is touched
    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = preflight.load_tokenizer_checked(
        str(folder) if has_tok else (cfg.model.tokenizer or str(folder)), "--model tokenizer")
    preflight.check_model(cfg, tokenizer, folder=str(folder), lisa=False)
    train_specs, val_specs, skipped = cfg.data.source_specs(), cfg.data.validation_specs(), {}
    preflight.check_paths([*train_specs, *val_specs], ["source"] * len(train_specs)
                          + ["validation file"] * len(val_specs))
    inputs = [folder, *(Path(s.path) for s in [*train_specs, *val_specs])]
    if held_out is not None:
        train_specs, skipped = held_out_specs(held_out, train_specs)
        inputs.append(Path(held_out))
    outputs.prepare_out_dir(out, resume=False, overwrite=overwrite, inputs=inputs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(path=str(folder), dtype=cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code).to(device).eval()
    # load_sources wants a training list; if every source was skipped, the validation list
    # stands in and its training part goes unused (jobs below come from train_specs).
    with checks.diagnosed([*train_specs, *val_specs], cfg.data.max_length):
        data = load_sources(train_specs or val_specs, val_specs, tokenizer, cfg.data.max_length,
                            cfg.data.cache_dir or str(out / "cache"), num_proc=cfg.data.num_proc)
    pad = tokenizer.pad_token_id
    jobs = [(s, "source", data.train[i], list(range(len(data.train[i]))))
            for i, s in enumerate(train_specs)]
    val_source = data.val["source"]
    jobs += [(s, "validation", data.val, [j for j, v in enumerate(val_source) if v == k])
             for k, s in enumerate(val_specs)]
    sets = []
    for spec, role, ds, pool in tqdm(jobs, desc="evaluating", disable=not progress):
        idx = [pool[j] for j in _subset(len(pool), max_examples, seed)]
        rows = _rows(ds, idx)
        acc = answer_accuracy(model, tokenizer, spec, max_examples, seed, max_new_tokens, device)
        sets.append({"name": spec.name, "role": role,
                     "loss": token_mean_loss(model, rows, pad, batch_size, device),
                     "tokens": int(sum(rows["n_target"])), "examples": len(idx), **acc})
    idx = _subset(len(data.val), max_examples, seed)
    rows = _rows(data.val, idx)
    sets.append({"name": "validation", "role": "validation_all",
                 "loss": token_mean_loss(model, rows, pad, batch_size, device),
                 "tokens": int(sum(rows["n_target"])), "examples": len(idx),
                 "checkable": None, "correct": None, "accuracy": None})
    doc = {"model": str(folder.resolve()), "max_examples": max_examples, "seed": seed,
           "max_new_tokens": max_new_tokens,
           "held_out": None if held_out is None else str(Path(held_out).resolve()),
           "skipped": skipped, "sets": sets}
    outputs.atomic_write_text(out / "results.json", json.dumps(doc, indent=2) + "\n")
    run_folder.finish(out)
    return doc


def format_table(doc: dict) -> str:
    """A plain-text table of ``doc["sets"]``: name, role, loss, examples, accuracy."""
    lines = [f"{'set':<24} {'role':<14} {'loss':>8} {'examples':>8} {'accuracy':>14}"]
    for s in doc["sets"]:
        acc = ("-" if s["accuracy"] is None
               else f"{s['accuracy']:.3f} ({s['correct']}/{s['checkable']})")
        lines.append(f"{s['name']:<24} {s['role']:<14} {s['loss']:>8.4f} {s['examples']:>8} "
                     f"{acc:>14}")
    return "\n".join(lines)
