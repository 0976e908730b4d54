"""The config a checkpoint belongs to: its flat record with a SHA-256, the differences from the
resuming config, and which of them a resume may follow."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

# ------------------------------------------------------------ the config a checkpoint belongs to
# What may differ between a checkpoint's config and the resuming one: the length of the run, how
# often and how much is saved, and how the machine is used: threads, caches, and how the global
# batch is laid out over ranks and forwards (data.world_size, data.micro_batch_size: the batch,
# its normalisers and so the update stay the same; only the order of float sums changes).
# engine.kind may change between the torch engines, whose checkpoints reshard, as long as the
# weights keep their precision (_kind_change_ok). Everything else changes the data, the models or
# the update, so mixing settings across a resume would describe no run at all.
RESUMABLE_KEYS = ("bilevel.steps", "run.checkpoint_every", "run.keep_checkpoints", "run.tracker",
                  "run.threads", "data.cache_dir", "data.num_proc", "data.world_size",
                  "data.micro_batch_size", "data.micro_batches", "engine.kind")
RESUMABLE_NOTE = ("engine.kind only between single, ddp and fsdp2, and with engine.bf16 only "
                  "between single and ddp")
_TORCH_KINDS = ("single", "ddp", "fsdp2")


def _kind_change_ok(kinds: tuple, values: dict | None) -> bool:
    """A change of engine.kind that a resume can follow: both torch engines (same checkpoint
    format), and the same precision (engine.bf16 casts the weights under fsdp2 only; unknown
    ``values`` count as bf16)."""
    if not all(k in _TORCH_KINDS for k in kinds):
        return False
    bf16 = True if values is None else values.get("engine.bf16", False)
    return not bf16 or "fsdp2" not in kinds


def config_record(cfg) -> dict:
    """The resolved config (a dataclass tree) as flat ``{"section.key[i].field": value}`` plus
    its SHA-256: what a checkpoint stores."""
    flat = _flatten(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    text = json.dumps(flat, sort_keys=True)
    return {"values": flat, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        if not value and prefix:
            return {prefix: {}}
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list):
        if not value:
            return {prefix: []}
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


_ABSENT = "<absent>"


def config_changes(stored: dict, current: dict) -> dict[str, tuple]:
    """``{key: (stored value, current value)}`` for every key whose value differs (a key missing
    on one side has the value ``"<absent>"``)."""
    if stored.get("sha256") == current["sha256"]:
        return {}
    a, b = stored["values"], current["values"]
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def refused_changes(changes: dict[str, tuple], values: dict | None = None) -> dict[str, tuple]:
    """The changes not in :data:`RESUMABLE_KEYS` (engine.kind: see :data:`RESUMABLE_NOTE`;
    ``values`` is the resuming config's record, for engine.bf16), except a ``section.field``
    that one side does not know at all (a setting added or removed by another version of
    scalebio, not by the user; entries of lists and mappings, such as a source or a
    model.config key, still count)."""
    def version_only(key: str, values: tuple) -> bool:
        return _ABSENT in values and re.fullmatch(r"\w+\.\w+", key) is not None

    def allowed(key: str, change: tuple) -> bool:
        if key == "engine.kind":
            return _kind_change_ok(change, values)
        return key in RESUMABLE_KEYS or version_only(key, change)

    return {k: v for k, v in changes.items() if not allowed(k, v)}
