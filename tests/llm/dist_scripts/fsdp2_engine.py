"""2-rank check of the FSDP2 engine (run under torch.distributed.run, gloo).

Ranks accumulate 2 micro-batches per step, each one backward through u and w. (1) bf16 + AdamW
+ LISA: per-rank optimizer bytes, frozen shards bit-identical, active shards moving, state_dict
round trip, full state dict on rank 0. (2) fp32 SGD without clipping against one process on the
whole batch (weights and the global grad norm). Writes JSON to argv[1].
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import PAPER_LISA, block_prefix, lm_loss, tiny_model, token_batch  # noqa: E402

from scalebio.llm.engines.engine import OptimizerSpec  # noqa: E402
from scalebio.llm.engines.lisa import LisaConfig, active_blocks_for  # noqa: E402
from scalebio.llm.engines.torch_engine import (  # noqa: E402
    build_fsdp2_engine,
    build_single_engine,
)

STEPS, LR, CLIP, SEED, SGD_LR = 6, 1e-2, 0.5, 5, 0.3
CFG = LisaConfig(n_active=1, period=2, **PAPER_LISA)
ADAM, SGD = OptimizerSpec(lr=LR), OptimizerSpec(name="sgd")


def _local(p: torch.Tensor) -> torch.Tensor:
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def run(engines, rank: int | None, lr: float, clip: float | None, start: int = 0,
        steps: int = STEPS):
    """Train u and w; returns (norms, frozen_ok, active_moved)."""
    norms, frozen_ok, moved = [], True, True
    for step in range(start, start + steps):
        for stream, e in zip("uw", engines):
            e.set_active_blocks(active_blocks_for(step, SEED, 4, CFG, stream))
        ids, val = token_batch(2 * step, batch=4), token_batch(2 * step + 1, batch=4)
        if rank is not None:
            ids, val = ids[2 * rank: 2 * rank + 2], val[2 * rank: 2 * rank + 2]
        before = [{n: _local(p) for n, p in e.module.named_parameters()} for e in engines]
        u, w = (e.module for e in engines)
        # ranks accumulate 2 micro-batches (2 backwards); the whole-batch replay uses one
        micro = 1 if rank is None else 2
        for i, v in zip(ids.chunk(micro), val.chunk(micro)):
            ((lm_loss(u, i) + 0.5 * lm_loss(w, i) + lm_loss(w, v)) / micro).backward()
        norms.append([e.step(lr, clip) for e in engines])
        for e, snap in zip(engines, before):
            for n, p in e.module.named_parameters():
                frozen = n.startswith(block_prefix()) and int(n.split(".")[2]) not in e.opt.active
                same = torch.equal(_local(p), snap[n])
                frozen_ok &= same if frozen else True
                moved &= (not same) if not frozen else True
    return norms, frozen_ok, moved


def flat(engines) -> torch.Tensor:
    return torch.cat([_local(p).float().reshape(-1)
                      for e in engines for p in e.module.parameters()])


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 ranks, got {world}"  # a silent 1-process fallback fails here

    # (1) bf16 + AdamW + LISA
    full = build_fsdp2_engine(tiny_model("llama"), ADAM, None, bf16=True)
    lm_loss(full.module, token_batch(0)[rank: rank + 1]).backward()
    full.step(LR, None)
    total = sum(p.numel() for p in full.module.parameters())
    block = sum(p.numel() for p in full.module.model.layers[0].parameters())
    bound = ((total - 3 * block) / total + 0.01) * full.optimizer_state_bytes()
    del full
    engines = [build_fsdp2_engine(tiny_model("llama"), ADAM, CFG, bf16=True) for _ in range(2)]
    _, frozen_ok, moved = run(engines, rank, LR, CLIP, steps=4)
    state_bytes = max(e.optimizer_state_bytes() for e in engines)
    saved = [e.state_dict() for e in engines]
    run(engines, rank, LR, CLIP, start=4, steps=3)
    first = flat(engines)
    fresh = [build_fsdp2_engine(tiny_model("llama", seed=9), ADAM, CFG, bf16=True)
             for _ in range(2)]
    for e, s in zip(fresh, saved):
        e.load_state_dict(s)
    run(fresh, rank, LR, CLIP, start=4, steps=3)
    roundtrip = torch.equal(first, flat(fresh))
    full_sd = engines[0].full_model_state_dict()
    gathered = {n: p.full_tensor() for n, p in engines[0].module.named_parameters()}  # collective
    full_ok = rank != 0 or all(torch.equal(full_sd[n], v) for n, v in gathered.items())

    # (2) fp32 SGD parity with one process on the whole batch
    sgd = [build_fsdp2_engine(tiny_model("llama"), SGD, CFG) for _ in range(2)]
    norms, _, _ = run(sgd, rank, SGD_LR, None)
    mine = torch.cat([p.full_tensor().reshape(-1) for e in sgd for p in e.module.parameters()])

    facts = gather({"rank": rank, "frozen_ok": frozen_ok, "moved": moved, "bytes": state_bytes,
                    "bound": bound, "roundtrip": roundtrip, "full_keys": len(full_sd),
                    "full_ok": full_ok})
    if rank == 0:
        single = [build_single_engine(tiny_model("llama"), SGD, CFG) for _ in range(2)]
        ref_norms, _, _ = run(single, None, SGD_LR, None)
        ref = torch.cat([p.detach().reshape(-1) for e in single for p in e.module.parameters()])
        start = torch.cat([p.detach().reshape(-1) for p in tiny_model("llama").parameters()] * 2)
        result = {
            "world_size": world,
            "ranks_reporting": sorted(f["rank"] for f in facts),
            "frozen_identical": all(f["frozen_ok"] for f in facts),
            "active_moved": all(f["moved"] for f in facts),
            "state_bytes_within_bound": all(f["bytes"] <= f["bound"] for f in facts),
            "state_bytes": [f["bytes"] for f in facts],
            "roundtrip_bitwise": all(f["roundtrip"] for f in facts),
            "full_state_keys": [f["full_keys"] for f in facts],
            "full_state_matches": all(f["full_ok"] for f in facts),
            "max_abs_diff_vs_single": float((mine - ref).detach().abs().max()),
            "sgd_moved": float((ref - start).abs().max()),
            "max_norm_rel_diff": max(abs(a - b) / b for n, r in zip(norms, ref_norms)
                                     for a, b in zip(n, r)),
        }
        Path(sys.argv[1]).write_text(json.dumps(result))
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    # Every check above is done and written. Measured on the loaded 2-core machine: about one run
    # in ten then aborts in the interpreter's teardown ("terminate called without an active
    # exception", a C++ thread still joinable at exit), which torchrun reports as a failure;
    # leave without that teardown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
