"""2-rank check of sharded construction (run under torch.distributed.run, gloo).

(1) A tiny Llama from a config, deferred (meta parameters) then sharded by FSDP2, against today's
path (the full model built on every rank, then sharded): every local shard bit-identical at the
start and after 2 LISA steps (2 micro-batches each), fp32 and bf16.
(2) With argv[2] = a folder of safetensors weights: load u and w (a copy of the deferred model)
with FSDP2 in bf16, measuring this rank's peak RSS over the load (``VmHWM`` reset just before), and
compare every local shard with its rows of the file read by ``safetensors.safe_open``.
Writes JSON to argv[1].
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import PAPER_LISA, lm_loss, token_batch  # noqa: E402

from scalebio.llm.engines.engine import OptimizerSpec  # noqa: E402
from scalebio.llm.engines.lisa import LisaConfig  # noqa: E402
from scalebio.llm.engines.materialize import ModelSource, deferred_model  # noqa: E402
from scalebio.llm.engines.torch_engine import build_fsdp2_engine  # noqa: E402
from scalebio.llm.model import TINY_LLAMA, copy_model  # noqa: E402

ADAM = OptimizerSpec(lr=1e-2)
SCHEDULE = [[0, 1], [1, 2]]


def _status(key: str) -> int:
    """This process's ``/proc/self/status`` field in bytes (VmRSS: now, VmHWM: peak)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def _locals(engine) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in engine.module.parameters()]


def tiny_parity(rank: int) -> dict:
    out = {}
    for bf16 in (False, True):
        src = ModelSource(config=dict(TINY_LLAMA, tie_word_embeddings=bf16), seed=4)
        lisa = LisaConfig(n_active=2, period=1, **PAPER_LISA)
        new = build_fsdp2_engine(copy_model(deferred_model(src)), ADAM, lisa, bf16=bf16)
        old = build_fsdp2_engine(src.load(), ADAM, lisa, bf16=bf16)
        same = [all(torch.equal(a, b) for a, b in zip(_locals(new), _locals(old)))]
        for step, active in enumerate(SCHEDULE):
            for engine in (new, old):
                engine.set_active_blocks(active)
                for micro in range(2):
                    ids = token_batch(10 * step + 2 * micro + rank)
                    ids = ids.clamp(max=TINY_LLAMA["vocab_size"] - 1)
                    (lm_loss(engine.module, ids) / 2).backward()
                engine.step(1e-2, 1.0)
            same.append(all(torch.equal(a, b) for a, b in zip(_locals(new), _locals(old))))
        out["bf16" if bf16 else "fp32"] = same
    return out


def large_load(folder: str, rank: int, world: int) -> dict:
    from safetensors import safe_open

    lisa = LisaConfig(n_active=1, train_embeddings=False, train_head=False)  # masters: norms only
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status("VmRSS")
    w = deferred_model(ModelSource(path=folder, dtype="bfloat16"))
    u = copy_model(w)
    engines = [build_fsdp2_engine(m, ADAM, lisa) for m in (u, w)]
    peak = _status("VmHWM")
    local = sum(p.to_local().untyped_storage().nbytes()
                for e in engines for p in e.module.parameters())
    full = sum(p.numel() * p.element_size() for e in engines for p in e.module.parameters())
    largest = max(p.numel() * p.element_size() for p in engines[0].module.parameters())
    equal = True
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        for e in engines:
            for name, p in e.module.named_parameters():
                rows = -(-p.shape[0] // world)  # Shard(0): ceil-sized chunks, the last shorter
                lo, hi = min(rank * rows, p.shape[0]), min((rank + 1) * rows, p.shape[0])
                equal &= torch.equal(p.to_local(), f.get_slice(name)[lo:hi])
    return {"baseline": baseline, "peak": peak, "local_bytes": local, "full_bytes": full,
            "largest_tensor": largest, "shards_equal_file": bool(equal)}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result = {"tiny": tiny_parity(rank)}
    if len(sys.argv) > 2:
        result["large"] = large_load(sys.argv[2], rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({"world_size": world, "ranks": gathered}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
