"""Checkpoints: both models, λ, every optimizer state, RNG state, the step (= data position and
LISA state, since both are pure functions of (seed, step)), and the resolved config.

Layout of ``step_<8 digits>/``:

* ``dcp/``: the torch engines' states (weights, optimizer state, fp32 masters of ``single``,
  ``ddp`` and ``fsdp2``) in ``torch.distributed.checkpoint``'s format: each rank writes its
  shards (a replicated tensor is written once), and a load reshards to the world size and
  engine kind that reads it, so a run saved on 2 ranks resumes on 1 and the other way round;
* ``<engine>_rank<N>.pt``: the states of engines with their own per-rank format (DeepSpeed
  ZeRO), which resume only at the world size that wrote them;
* ``engines.json`` (rank 0): the world size, each engine's format and its non-tensor state (the
  active LISA blocks, identical on every rank);
* ``loop.pt`` (rank 0): λ, its optimizer, the step, the RNG state, the trajectory so far and the
  config: tiny and identical on every rank, so written once.

Written to a temporary folder and renamed into place, so a run killed mid-save leaves the previous
checkpoint intact. ``checksums.json`` (size and SHA-256 of every file, written last) lets a resume
tell a damaged checkpoint (a truncated or emptied file, a disk error) from a good one: the newest
intact checkpoint is used, and each skipped one is named in a warning. Checkpoints of earlier
versions (per-rank ``*_rank<N>.pt`` files for every engine, no ``engines.json``) still load at
the world size that wrote them; at another one the resume stops with an error naming both sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from scalebio.llm.config import ConfigError

log = logging.getLogger(__name__)

PREFIX = "step_"
CHECKSUMS = "checksums.json"
MANIFEST = "engines.json"
DCP_DIR = "dcp"
FORMAT = "scalebio-checkpoint-v2"  # v1: per-rank files for every engine, no engines.json
_NAME = re.compile(rf"{PREFIX}\d{{8}}")
_RANK_FILE = re.compile(r".*_rank(\d+)\.pt")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def _damage(ck: Path, rank: int, world: int) -> str | None:
    """Why ``ck`` cannot be used, from this rank's share of the files (its own per-rank files,
    and every ``world``-th of the others: each file is read by one rank), or None."""
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
    own = [n for n in table if (m := _RANK_FILE.fullmatch(n)) and int(m.group(1)) == rank]
    shared = sorted(n for n in table if not _RANK_FILE.fullmatch(n))
    for name in sorted(own) + shared[rank::world]:
        f, entry = ck / name, table[name]
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
    """The newest checkpoint under ``root`` whose files match their checksums (the ranks share
    the reading). Each newer one that does not is named in a warning (rank 0); None if none."""
    for ck in reversed([p for p in _checkpoints(root) if (p / "loop.pt").is_file()]):
        why = _damage(ck, rank, _world())
        if _all_ranks_agree(why is None):
            return ck
        if rank == 0:
            log.warning("checkpoint %s is damaged (%s); falling back to an older one", ck.name,
                        why or "a file another rank read")
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


# ------------------------------------------------------------ torch.distributed.checkpoint states
def _resharded(engine) -> bool:
    """Whether ``engine`` checkpoints through ``torch.distributed.checkpoint`` (the torch engine
    says so; any other engine keeps its own per-rank files)."""
    return getattr(engine, "checkpoint_format", None) == "dcp"


def _split(state: dict, prefix: str) -> tuple[dict, dict]:
    """A nested state dict as ``{"prefix/a/b": tensor}`` and its other leaves, nested (JSON)."""
    tensors, plain = {}, {}
    for key, value in state.items():
        if "/" in str(key):
            raise ValueError(f"checkpoint key {prefix}/{key}: '/' separates the levels")
        if isinstance(value, dict) and value:
            t, p = _split(value, f"{prefix}/{key}")
            tensors.update(t)
            if p:
                plain[key] = p
        elif isinstance(value, torch.Tensor):
            tensors[f"{prefix}/{key}"] = value
        else:
            plain[key] = value
    return tensors, plain


def _join(tensors: dict, plain: dict, prefix: str) -> dict:
    """Inverse of :func:`_split`."""
    out = json.loads(json.dumps(plain))
    for key, value in tensors.items():
        *path, leaf = key[len(prefix) + 1:].split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _quiet(call, *args, **kw):
    # Without a process group (engine.kind single) DCP warns that it saves "in a single process",
    # which is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return call(*args, **kw)


# ------------------------------------------------------------ save and load
def save_checkpoint(
    root: Path, step: int, loop_state: dict, engines: dict, rank: int, keep: int
) -> Path:
    """Write ``engines`` ({"u": e, "w": e}; a collective), ``loop_state`` (rank 0) and the
    checksums atomically (module doc); keep the ``keep`` newest checkpoints."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{PREFIX}{step:08d}.tmp"
    world, dcp_dir = _world(), tmp / DCP_DIR
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (dcp_dir if any(map(_resharded, engines.values())) else tmp).mkdir(parents=True)
    _barrier()
    manifest = {"format": FORMAT, "world_size": world, "engines": {}}
    mine, tensors = {}, {}
    for name, engine in engines.items():
        kind = getattr(engine, "kind", type(engine).__name__)
        if _resharded(engine):
            part, plain = _split(engine.state_dict(), name)
            tensors.update(part)
            manifest["engines"][name] = {"format": "dcp", "kind": kind, "state": plain}
        else:
            file = f"{name}_rank{rank}.pt"
            mine[file] = _save(engine.state_dict(), tmp / file)
            manifest["engines"][name] = {"format": "per_rank", "kind": kind}
    if tensors:
        _quiet(dcp.save, tensors, checkpoint_id=dcp_dir)
    del tensors
    _barrier()
    # DCP writes its files itself, so they are hashed after the write, each by one rank.
    written = sorted(p.relative_to(tmp).as_posix() for p in dcp_dir.rglob("*") if p.is_file())
    for name in written[rank::world]:
        mine[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / f".checksums_rank{rank}.json").write_text(json.dumps(mine))
    _barrier()
    if rank == 0:
        text = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        (tmp / MANIFEST).write_bytes(text)
        table = {"loop.pt": _save(loop_state, tmp / "loop.pt"),
                 MANIFEST: {"size": len(text), "sha256": hashlib.sha256(text).hexdigest()}}
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


def _manifest(ck: Path) -> dict | None:
    """``engines.json``, or None for a checkpoint of the earlier per-rank format."""
    f = ck / MANIFEST
    return json.loads(f.read_text()) if f.is_file() else None


def check_world_size(ck: Path) -> None:
    """``ConfigError`` naming both sizes when ``ck`` holds per-rank engine states (DeepSpeed's,
    or any of an earlier version) written by another world size than this run's."""
    manifest, world = _manifest(ck), _world()
    if manifest is None:
        ranks = {int(m.group(1)) for p in ck.iterdir() if (m := _RANK_FILE.fullmatch(p.name))}
        saved, what = max(ranks, default=world - 1) + 1, "an earlier scalebio version"
    else:
        kinds = sorted({e["kind"] for e in manifest["engines"].values()
                        if e["format"] == "per_rank"})
        saved, what = (manifest["world_size"] if kinds else world), ", ".join(kinds)
    if saved != world:
        raise ConfigError(
            f"--resume: {ck} holds per-rank engine states ({what}) written by {saved} rank(s); "
            f"they load only at that world size, and this run has {world}. Relaunch with "
            f"{saved} rank(s) (checkpoints of the single, ddp and fsdp2 engines of this version "
            "load at any world size; docs/engines.md, \"Checkpoints\")")


def load_checkpoint(path: Path, engines: dict, rank: int) -> dict:
    """Restore the engines' states in place (resharded to this world size where the format
    allows; a collective) and return the loop state."""
    check_world_size(path)
    manifest, resharded = _manifest(path), {}
    for name, engine in engines.items():
        entry = {"format": "per_rank"} if manifest is None else manifest["engines"].get(name)
        if entry is None:
            raise ConfigError(f"{path / MANIFEST}: holds no state of the engine {name!r}")
        if entry["format"] == "dcp":
            if not _resharded(engine):
                raise ConfigError(f"{path}: {name} was saved by the {entry['kind']} engine, "
                                  f"which {type(engine).__name__} cannot load")
            resharded[name] = entry["state"]
            continue
        f = path / f"{name}_rank{rank}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing")
        state = torch.load(f, weights_only=False)
        if manifest is None and _resharded(engine):  # earlier torch engine: shards or whole
            sharded = any(hasattr(v, "to_local") for v in state.get("model", {}).values())
            if sharded != (engine.kind == "fsdp2"):
                raise ConfigError(f"{f}: an earlier scalebio version's per-rank checkpoint "
                                  f"{'of fsdp2 ' if sharded else ''}loads only under the "
                                  f"engine.kind that wrote it, not {engine.kind}")
        engine.load_state_dict(state)
    if resharded:
        _load_resharded(path / DCP_DIR, {n: engines[n] for n in resharded}, resharded)
    return torch.load(path / "loop.pt", weights_only=False)


def _load_resharded(folder: Path, engines: dict, plain: dict) -> None:
    """Each engine's template (its own layout: this world size's shards), filled by DCP."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    targets, rest = {}, {}
    for name, engine in engines.items():
        held = {k[len(name) + 1:]: (tuple(m.size), m.properties.dtype) for k, m in saved.items()
                if k.startswith(f"{name}/") and isinstance(m, TensorStorageMetadata)}
        part, rest[name] = _split(engine.checkpoint_template(plain[name], held), name)
        want = {k[len(name) + 1:]: (tuple(t.shape), t.dtype) for k, t in part.items()}
        problems = [f"{k}: not in the checkpoint" for k in sorted(set(want) - set(held))]
        problems += [f"{k}: not in this model" for k in sorted(set(held) - set(want))]
        problems += [f"{k}: saved {held[k][1]} {list(held[k][0])}, here {v[1]} {list(v[0])}"
                     for k, v in sorted(want.items()) if k in held and held[k] != v]
        if problems:
            raise ConfigError(f"{folder}: the state of {name} does not fit this run's model "
                              f"({'; '.join(problems[:5])}"
                              f"{f'; {len(problems) - 5} more' if len(problems) > 5 else ''})")
        targets.update(part)
    _quiet(dcp.load, targets, checkpoint_id=folder)
    for name, engine in engines.items():
        mine = {k: v for k, v in targets.items() if k.startswith(f"{name}/")}
        engine.load_state_dict(_join(mine, rest[name], name))
