"""One-GPU check of the DeepSpeed engine (CUDA + NCCL), not part of the CPU test suite.

(1) fp32 parity: u and w, one backward per micro-batch, LISA switches, against a plain-torch LISA
loop on the same GPU (TF32 off); frozen blocks bit-identical after every step. (2) bf16 memory on
a ~270M-param Llama, 2 of 16 blocks active: allocated GPU bytes and optimizer-state bytes with
every block vs LISA, over 10 switches (constant = no leak), and the time of a switch.

Run: ``torchrun --nproc_per_node 1 --standalone ds_gpu_check.py OUT.json [--small]`` (``--small``:
a CPU/gloo dry run of the same code on tiny sizes). Writes JSON to OUT.json.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepspeed  # noqa: E402
from tiny_models import PAPER_LISA, block_prefix, reference_lisa_step, reference_step, tiny_model  # noqa: E402
from tiny_models import token_batch as batch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from scalebio.llm.engines.deepspeed_zero import (  # noqa: E402
    build_deepspeed_engine,
    init_deepspeed_distributed,
)
from scalebio.llm.engines.engine import OptimizerSpec  # noqa: E402
from scalebio.llm.engines.lisa import LisaConfig  # noqa: E402

SMALL = "--small" in sys.argv
CUDA = torch.cuda.is_available() and not SMALL
DEV = torch.device("cuda", 0) if CUDA else torch.device("cpu")
LR = 1e-3
SCHED = {"u": [[0], [0], [2], [2], [0], [0]], "w": [[1, 3], [1, 3], [2], [2], [1, 3], [1, 3]]}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def surrogate(u, w, step, mb):
    train, val = batch(100 * step + mb).to(DEV), batch(100 * step + 50 + mb).to(DEV)
    return (u(input_ids=train, labels=train).loss + 0.5 * w(input_ids=train, labels=train).loss
            + w(input_ids=val, labels=val).loss)


def block_of(name):
    prefix = block_prefix()
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def parity(stage):
    lisa, spec = LisaConfig(n_active=1, **PAPER_LISA), OptimizerSpec(lr=LR)
    eng = {k: build_deepspeed_engine(tiny_model(), spec, lisa, stage) for k in "uw"}
    ref = {k: tiny_model().to(DEV) for k in "uw"}
    ref_state = {"u": {}, "w": {}}
    prev = {k: e.full_model_state_dict() for k, e in eng.items()}
    frozen_ok, loss_diff = True, 0.0
    for step in range(len(SCHED["u"])):
        for k, e in eng.items():
            e.set_active_blocks(SCHED[k][step])
            reference_lisa_step(ref[k], ref_state[k], SCHED[k][step], LR, block_prefix(),
                                {"weight_decay": 0.0})
        for mb in range(2):
            loss = surrogate(eng["u"].module, eng["w"].module, step, mb)
            loss.backward()
            ref_loss = surrogate(ref["u"], ref["w"], step, mb)
            ref_loss.backward()
            loss_diff = max(loss_diff, abs(loss.item() - ref_loss.item()))
            del loss
        for k, e in eng.items():
            e.step(LR, None)
            reference_step(ref_state[k], LR, None)
            now = e.full_model_state_dict()
            for name, old in prev[k].items():
                blk = block_of(name)
                if blk is not None and blk not in SCHED[k][step]:
                    frozen_ok &= torch.equal(old, now[name])
            prev[k] = now
    weight_diff = max(float((prev[k][n] - p).abs().max()) for k in "uw"
                      for n, p in ref[k].state_dict().items())
    return {"frozen_bit_identical": frozen_ok, "max_loss_diff": loss_diff,
            "max_weight_diff": weight_diff}


def memory(stage):
    layers, hidden, ffn, vocab = (4, 64, 128, 512) if SMALL else (16, 1024, 2816, 32000)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=16 if not SMALL else 4, vocab_size=vocab,
                      max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_deepspeed_engine(model, OptimizerSpec(lr=1e-5),
                                    LisaConfig(n_active=2, **PAPER_LISA), stage, bf16=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 256), generator=gen).to(DEV)

    def train_step(e):
        loss = e.module(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        e.step(1e-5, 1.0)
        sync()

    engine.set_active_blocks(None)
    train_step(engine)
    full = {"allocated": allocated(), "state_bytes": engine.optimizer_state_bytes()}
    alloc, switch_s, peaks = [], [], []
    for k in range(10):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        engine.set_active_blocks([k % layers, (k + 5) % layers])
        sync()
        switch_s.append(time.perf_counter() - t0)
        train_step(engine)
        alloc.append(allocated())
        peaks.append(torch.cuda.max_memory_allocated() if CUDA else 0)
    out = {"params": n_params, "full": full, "lisa_state_bytes": engine.optimizer_state_bytes(),
           "lisa_allocated": alloc, "peak_allocated_during_switch_and_step": peaks,
           "switch_seconds": [round(s, 3) for s in switch_s]}
    del engine, model
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return out


def main():
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    init_deepspeed_distributed("nccl" if CUDA else "gloo")
    result = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu",
              "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    for stage in (2, 3):
        result[f"zero{stage}"] = {"parity": parity(stage), "memory": memory(stage)}
        print(json.dumps(result[f"zero{stage}"]), flush=True)
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
