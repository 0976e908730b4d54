"""Engine check on an accelerator (manual; not part of the CPU test suite).

Run: ``torchrun --nproc_per_node 1 tests/llm/dist_scripts/accelerator_check.py OUT.json``.
On a CUDA machine it uses nccl and a 1-GPU mesh; elsewhere gloo on CPU (to try the script).
A Llama of 8 blocks (hidden 512, vocab 4096), u and w with one backward, LISA n_active=2:
(1) FSDP2 bf16: frozen blocks bit-identical, active ones move, optimizer bytes within the bound,
allocated device memory constant over the switches, switch time; (2) fp32 FSDP2 and the single
engine against the plain-torch LISA loop (max |Δparam|); (3) single engine in bf16 (masters).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import PAPER_LISA, block_prefix, reference_lisa_step, reference_step  # noqa: E402

from scalebio.llm.engines.engine import OptimizerSpec  # noqa: E402
from scalebio.llm.engines.lisa import LisaConfig, active_blocks_for  # noqa: E402
from scalebio.llm.engines.torch_engine import (  # noqa: E402
    build_fsdp2_engine,
    build_single_engine,
)

LR, CLIP, SEED, STEPS = 1e-3, 1.0, 4, int(sys.argv[2]) if len(sys.argv) > 2 else 12
CFG = LisaConfig(n_active=2, period=2, **PAPER_LISA)
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda", 0) if CUDA else torch.device("cpu")
KEYS = ("frozen_ok", "active_unmoved", "active_count", "mem")


def model(seed: int = 0):
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                      max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(cfg)
    return m.to(DEV)


def batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, 4096, (4, 128), generator=gen).to(DEV)


def loss(u, w, step):
    ids, val = batch(2 * step), batch(2 * step + 1)
    return (u(input_ids=ids, labels=ids).loss + 0.5 * w(input_ids=ids, labels=ids).loss
            + w(input_ids=val, labels=val).loss)


def local(p):
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def run(engines, steps=STEPS, checks=False):
    # active_unmoved: active tensors whose *stored* weights did not change in a step (in bf16 an
    # update below half an ulp, e.g. 1e-3 on a norm scale of 1.0, moves only the fp32 master)
    out = {"frozen_ok": True, "active_unmoved": 0, "active_count": 0, "mem": [], "switch_ms": [],
           "norms": []}
    for step in range(steps):
        t = time.perf_counter()
        for stream, e in zip("uw", engines):
            e.set_active_blocks(active_blocks_for(step, SEED, 8, CFG, stream))
        out["switch_ms"].append(1e3 * (time.perf_counter() - t))
        before = [{n: local(p) for n, p in e.module.named_parameters()} for e in engines]
        loss(*(e.module for e in engines), step).backward()
        out["norms"].append([e.step(LR, CLIP) for e in engines])
        if CUDA:
            torch.cuda.synchronize()
            out["mem"].append(torch.cuda.memory_allocated())
        for e, snap in zip(engines, before if checks else []):
            for n, p in e.module.named_parameters():
                frozen = n.startswith(block_prefix()) and int(n.split(".")[2]) not in e.opt.active
                same = torch.equal(local(p), snap[n])
                out["frozen_ok"] &= same if frozen else True
                out["active_unmoved"] += int(same and not frozen)
                out["active_count"] += int(not frozen)
        del before
    return out


def reference(steps=STEPS):
    ref, states = [model(), model()], [{}, {}]
    for step in range(steps):
        for stream, m, st in zip("uw", ref, states):
            active = active_blocks_for(step, SEED, 8, CFG, stream)
            reference_lisa_step(m, st, active, LR, block_prefix(), {"weight_decay": 0.0})
        loss(*ref, step).backward()
        for st in states:
            reference_step(st, LR, CLIP)
    return ref


def max_diff(engines, ref) -> float:
    return max(float((local(p).float() - q.detach().float()).abs().max())
               for e, m in zip(engines, ref)
               for p, q in zip(e.module.parameters(), m.parameters()))


def main() -> None:
    dist.init_process_group("nccl" if CUDA else "gloo")
    if CUDA:
        torch.cuda.set_device(0)
    result = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu",
              "torch": torch.__version__, "world": dist.get_world_size()}
    full = build_fsdp2_engine(model(), OptimizerSpec(lr=LR), None, bf16=True)
    loss(full.module, full.module, 0).backward()
    full.step(LR, None)
    total = sum(p.numel() for p in full.module.parameters())
    blk = sum(p.numel() for p in full.module.model.layers[0].parameters())
    share = (total - 6 * blk) / total
    result["full_state_bytes"] = full.optimizer_state_bytes()
    del full
    engines = [build_fsdp2_engine(model(), OptimizerSpec(lr=LR), CFG, bf16=True) for _ in range(2)]
    r = run(engines, checks=True)
    result["fsdp2_bf16"] = {k: r[k] for k in KEYS + ("switch_ms",)}
    result["fsdp2_bf16"]["state_bytes"] = [e.optimizer_state_bytes() for e in engines]
    result["fsdp2_bf16"]["bound"] = (share + 0.01) * result["full_state_bytes"]
    result["fsdp2_bf16"]["state_on_device"] = all(
        local(t).device.type == DEV.type
        for e in engines for s in e.opt.optimizer.state.values() for t in s.values() if t.ndim)
    del engines
    ref = reference()
    fsdp = [build_fsdp2_engine(model(), OptimizerSpec(lr=LR), CFG) for _ in range(2)]
    run(fsdp)
    result["fsdp2_fp32_max_diff_vs_torch"] = max_diff(fsdp, ref)
    del fsdp
    single = [build_single_engine(model(), OptimizerSpec(lr=LR), CFG) for _ in range(2)]
    run(single)
    result["single_fp32_max_diff_vs_torch"] = max_diff(single, ref)
    del single
    bf = [build_single_engine(model().to(torch.bfloat16), OptimizerSpec(lr=LR), CFG)
          for _ in range(2)]
    r = run(bf, checks=True)
    result["single_bf16"] = {k: r[k] for k in KEYS}
    result["single_bf16"]["state_bytes"] = [e.optimizer_state_bytes() for e in bf]
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
