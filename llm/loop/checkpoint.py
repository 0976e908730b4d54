"""Checkpoints: both models, λ, every optimizer state, RNG state, the step (= data position and
LISA state, since both are pure functions of (seed, step)), and the resolved config.

Written to a temporary folder and renamed into place, so a run killed mid-save leaves the previous
checkpoint intact. ``checksums.json`` (size and SHA-256 of every file, written last) lets a resume
tell a damaged checkpoint (a truncated or emptied file, a disk error) from a good one: the newest
intact checkpoint is used, and each skipped one is named in a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREFIX = "step_"
CHECKSUMS = "checksums.json"
_NAME = re.compile(rf"{PREFIX}\d{{8}}")
_RANK_FILE = re.compile(r".*_rank(\d+)\.pt")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders (``step_<8 digits>``, not ``.tmp``), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (complete = has ``loop.pt``)."""
    done = [p for p in _checkpoints(root) if (p / "loop.pt").is_file()]
    return done[-1] if done else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _damage(ck: Path, rank: int) -> str | None:
    """Why ``ck`` cannot be used by ``rank`` (its own files, and the shared ones), or None."""
    listing = ck / CHECKSUMS
    if not listing.is_file():  # written before checksums existed: loop.pt must at least load
        try:
            torch.load(ck / "loop.pt", weights_only=False)
        except Exception as e:
            return f"{ck / 'loop.pt'} cannot be read ({type(e).__name__}: {e})"
        return None
    try:
        table = json.loads(listing.read_text())
    except (OSError, ValueError) as e:
        return f"{listing} cannot be read ({e})"
    for name, entry in sorted(table.items()):
        m = _RANK_FILE.fullmatch(name)
        if m is not None and int(m.group(1)) != rank:
            continue  # another rank checks its own files
        f = ck / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != entry["size"]:
            return f"{f} has {size} bytes, {entry['size']} were written"
        if _sha256(f) != entry["sha256"]:
            return f"{f} has changed since it was written (SHA-256 differs)"
    return None


def _all_ranks_agree(ok: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def newest_intact(root: Path, rank: int = 0) -> Path | None:
    """The newest checkpoint under ``root`` whose files match their checksums (on every rank).
    Each newer one that does not is named in a warning (rank 0); None when there is none."""
    for ck in reversed([p for p in _checkpoints(root) if (p / "loop.pt").is_file()]):
        why = _damage(ck, rank)
        if _all_ranks_agree(why is None):
            return ck
        if rank == 0:
            log.warning("checkpoint %s is damaged (%s); falling back to an older one", ck.name,
                        why or "a file of another rank")
    return None


class _Hashing:
    """A write-only file that hashes what passes through it (torch.save writes sequentially),
    so a checkpoint's checksums cost no second read."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _save(obj, path: Path) -> dict:
    with open(path, "wb") as f:
        out = _Hashing(f)
        torch.save(obj, out)
    return {"size": out.size, "sha256": out.sha.hexdigest()}


def save_checkpoint(
    root: Path, step: int, loop_state: dict, engines: dict, rank: int, keep: int
) -> Path:
    """Write ``engines`` ({"u": e, "w": e}) per rank, ``loop_state`` and the checksums (rank 0),
    atomically; keep the ``keep`` newest checkpoints."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{PREFIX}{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    mine = {f"{name}_rank{rank}.pt": _save(engine.state_dict(), tmp / f"{name}_rank{rank}.pt")
            for name, engine in engines.items()}
    (tmp / f".checksums_rank{rank}.json").write_text(json.dumps(mine))
    _barrier()
    if rank == 0:
        table = {"loop.pt": _save(loop_state, tmp / "loop.pt")}
        for part in sorted(tmp.glob(".checksums_rank*.json")):
            table.update(json.loads(part.read_text()))
            part.unlink()
        (tmp / CHECKSUMS).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = [p for p in _checkpoints(root) if p != final]
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, engines: dict, rank: int) -> dict:
    """Restore engine states of this rank in place and return the loop state."""
    for name, engine in engines.items():
        f = path / f"{name}_rank{rank}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; was the run saved with another world size?")
        engine.load_state_dict(torch.load(f, weights_only=False))
    return torch.load(path / "loop.pt", weights_only=False)


# ------------------------------------------------------------ the config a checkpoint belongs to
# What may differ between a checkpoint's config and the resuming one: the length of the run, how
# often and how much is saved, and how the machine is used. Everything else changes the data, the
# models or the update, so mixing settings across a resume would describe no run at all.
RESUMABLE_KEYS = ("bilevel.steps", "run.checkpoint_every", "run.keep_checkpoints", "run.tracker",
                  "run.threads", "data.cache_dir", "data.num_proc")


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


def refused_changes(changes: dict[str, tuple]) -> dict[str, tuple]:
    """The changes not in :data:`RESUMABLE_KEYS`, except a ``section.field`` that one side does
    not know at all (a setting added or removed by another version of scalebio, not by the
    user; entries of lists and mappings, such as a source or a model.config key, still count)."""
    def version_only(key: str, values: tuple) -> bool:
        return _ABSENT in values and re.fullmatch(r"\w+\.\w+", key) is not None

    return {k: v for k, v in changes.items()
            if k not in RESUMABLE_KEYS and not version_only(k, v)}
