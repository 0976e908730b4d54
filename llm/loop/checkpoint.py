"""Checkpoints: both models, λ, every optimizer state, RNG state, the step (= data position and
LISA state, since both are pure functions of (seed, step)). Written to a temporary folder and
renamed into place, so a run killed mid-save leaves the previous checkpoint intact."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

PREFIX = "step_"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (complete = has ``loop.pt``)."""
    if not root.is_dir():
        return None
    done = sorted(
        p
        for p in root.glob(f"{PREFIX}*")
        if p.is_dir() and (p / "loop.pt").is_file() and not p.name.endswith(".tmp")
    )
    return done[-1] if done else None


def save_checkpoint(
    root: Path, step: int, loop_state: dict, engines: dict, rank: int, keep: int
) -> Path:
    """Write ``engines`` ({"u": e, "w": e}) per rank and ``loop_state`` (rank 0), atomically."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{PREFIX}{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    for name, engine in engines.items():
        torch.save(engine.state_dict(), tmp / f"{name}_rank{rank}.pt")
    _barrier()
    if rank == 0:
        torch.save(loop_state, tmp / "loop.pt")  # written last: marks the folder complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p != final)
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
