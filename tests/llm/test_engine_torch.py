"""Single-process / DDP torch engine: LISA freezing, state bytes, leaks, parity, checkpoints."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import (
    LAYERS,
    PAPER_LISA,
    block_prefix,
    lm_loss,
    reference_lisa_step,
    reference_step,
    tiny_model,
    token_batch,
)

from scalebio.llm.engines.engine import OptimizerSpec, live_tensor_bytes
from scalebio.llm.engines.lisa import LisaConfig, active_blocks_for
from scalebio.llm.engines.torch_engine import build_single_engine

LR = 1e-2
CLIP = 0.5  # below the tiny model's grad norm (≈ 1.5–3.5), so the clipping path really runs
SEED = 7
# The optimizer-state bound of the task: LISA state ≤ (active share + this slack) × full state;
# the slack covers AdamW's per-tensor `step` scalars, which do not scale with tensor size.
BYTES_SLACK = 0.01
# 2-rank DDP vs one process on the whole batch, SGD, relative to how far the weights moved: half-
# and full-batch forward/backward sum in different orders (fp32 round-off; measured 1.9e-6).
DDP_PARITY_RTOL = 2e-5


STEPS_LEAK = 16  # with period 1 and 4 blocks this fixed seed gives ≥ 10 switches


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _block_of(name: str) -> int | None:
    prefix = block_prefix("llama")
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def _grad(engine, p: torch.Tensor) -> torch.Tensor | None:
    """p's gradient: on p, or, for bf16 weights (fp32 accumulation), on its fp32 master."""
    master = engine.opt.masters.get(id(p))
    return p.grad if master is None or p.grad is not None else master.grad


def _active_share(model, n_active: int) -> float:
    total = sum(p.numel() for p in model.parameters())
    blocks = [0] * len(model.model.layers)
    for n, p in model.named_parameters():
        if _block_of(n) is not None:
            blocks[_block_of(n)] += p.numel()
    return (total - sum(blocks) + n_active * blocks[0]) / total


def _full_state_bytes(dtype: torch.dtype) -> int:
    engine = build_single_engine(tiny_model("llama", dtype=dtype), OptimizerSpec(lr=LR), None)
    lm_loss(engine.module, token_batch(0)).backward()
    engine.step(LR, None)
    return engine.optimizer_state_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lisa_freezes_trains_and_bounds_state(dtype):
    cfg = LisaConfig(n_active=1, period=2, **PAPER_LISA)
    model = tiny_model("llama", dtype=dtype)
    engine = build_single_engine(model, OptimizerSpec(lr=LR), cfg)
    bound = (_active_share(model, 1) + BYTES_SLACK) * _full_state_bytes(dtype)
    embed = engine.opt.layout.persistent[0]
    trained_ever, reactivated_moved, prev_active = set(), False, None
    for step in range(12):
        active = active_blocks_for(step, SEED, 4, cfg, "u")
        engine.set_active_blocks(active)
        before = _snapshot(model)
        lm_loss(model, token_batch(step)).backward()
        for name, p in model.named_parameters():  # frozen blocks cost no gradient at all
            assert (_grad(engine, p) is None) == (_block_of(name) not in (None, *active)), name
        engine.step(LR, CLIP)
        after = _snapshot(model)
        for name in before:
            block = _block_of(name)
            if block is not None and block not in active:
                assert torch.equal(before[name], after[name]), f"frozen {name} moved at {step}"
            else:
                assert not torch.equal(before[name], after[name]), f"{name} idle at {step}"
        if active != prev_active and trained_ever & set(active):
            reactivated_moved = True  # the loop above already asserted these blocks moved
        trained_ever |= set(active)
        prev_active = active
        assert engine.optimizer_state_bytes() <= bound
        assert engine.opt.optimizer.state[engine.opt._opt_tensor(embed)]["step"] == step + 1
    assert reactivated_moved and len(trained_ever) >= 3  # fixed seed: blocks 0, 2, 3


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_lisa_on_every_family(family):
    cfg = LisaConfig(n_active=1, period=1, **PAPER_LISA)
    engine = build_single_engine(tiny_model(family), OptimizerSpec(lr=LR), cfg)
    blocks = engine.opt.layout.blocks
    for step in range(3):
        active = active_blocks_for(step, SEED, len(blocks), cfg, "w")
        engine.set_active_blocks(active)
        before = [[p.detach().clone() for p in ps] for ps in blocks]
        lm_loss(engine.module, token_batch(step)).backward()
        engine.step(LR, CLIP)
        for i, (ps, old) in enumerate(zip(blocks, before)):
            moved = [not torch.equal(p, q) for p, q in zip(ps, old)]
            assert all(moved) if i in active else not any(moved), (family, i, step)


def test_live_memory_constant_over_switches():
    cfg = LisaConfig(n_active=1, period=1, **PAPER_LISA)
    engine = build_single_engine(tiny_model("llama"), OptimizerSpec(lr=LR), cfg)
    gc.collect()
    gc.freeze()  # the scan then sees only tensors made from here on: fast, and a leak is new
    try:
        live = []
        for step in range(STEPS_LEAK):
            engine.set_active_blocks(active_blocks_for(step, SEED, 4, cfg, "u"))
            loss = lm_loss(engine.module, token_batch(step))
            loss.backward()
            del loss
            engine.step(LR, CLIP)
            live.append(live_tensor_bytes())
    finally:
        gc.unfreeze()
    switches = sum(
        active_blocks_for(s, SEED, 4, cfg, "u") != active_blocks_for(s - 1, SEED, 4, cfg, "u")
        for s in range(1, STEPS_LEAK)
    )
    assert switches >= 10
    assert live[0] > 0 and all(b == live[0] for b in live), live


def _two_engine_run(engines, steps, start=0, clip=CLIP, cfg=None):
    """The ScaleBiO pattern: one backward through u and w, then each engine steps."""
    norms = []
    for step in range(start, start + steps):
        if cfg is not None:
            for stream, e in zip("uw", engines):
                e.set_active_blocks(active_blocks_for(step, SEED, 4, cfg, stream))
        u, w = (e.module for e in engines)
        ids, val = token_batch(2 * step), token_batch(2 * step + 1)
        (lm_loss(u, ids) + 0.5 * lm_loss(w, ids) + lm_loss(w, val)).backward()
        norms.append([e.step(LR, clip) for e in engines])
    return norms


def test_parity_with_plain_torch_lisa_loop():
    cfg = LisaConfig(n_active=2, period=2, **PAPER_LISA)
    engines = [build_single_engine(tiny_model("llama"), OptimizerSpec(lr=LR), cfg)
               for _ in range(2)]
    norms = _two_engine_run(engines, 8, cfg=cfg)
    ref, states, ref_norms = [tiny_model("llama") for _ in range(2)], [{}, {}], []
    for step in range(8):
        for stream, m, st in zip("uw", ref, states):
            active = active_blocks_for(step, SEED, 4, cfg, stream)
            reference_lisa_step(m, st, active, LR, block_prefix(), {"weight_decay": 0.0})
        ids, val = token_batch(2 * step), token_batch(2 * step + 1)
        (lm_loss(ref[0], ids) + 0.5 * lm_loss(ref[1], ids) + lm_loss(ref[1], val)).backward()
        ref_norms.append([reference_step(st, LR, CLIP) for st in states])
    assert max(max(n) for n in norms) > CLIP  # clipping was exercised
    assert norms == ref_norms  # same ops in the same order: bit-exact
    for e, m in zip(engines, ref):
        for (name, p), q in zip(e.module.named_parameters(), m.parameters()):
            assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_roundtrip_is_bitwise(dtype):
    cfg = LisaConfig(n_active=1, period=2, **PAPER_LISA)
    engines = [build_single_engine(tiny_model("llama", dtype=dtype), OptimizerSpec(lr=LR), cfg)
               for _ in range(2)]
    _two_engine_run(engines, 3, cfg=cfg)
    saved = [e.state_dict() for e in engines]
    _two_engine_run(engines, 3, start=3, cfg=cfg)
    first = [_snapshot(e.module) for e in engines]
    fresh = [build_single_engine(tiny_model("llama", seed=99, dtype=dtype),
                                 OptimizerSpec(lr=LR), cfg) for _ in range(2)]
    for e, s in zip(fresh, saved):
        e.load_state_dict(s)
    _two_engine_run(fresh, 3, start=3, cfg=cfg)
    for e, snap in zip(fresh, first):
        for name, p in e.module.named_parameters():
            assert torch.equal(p, snap[name]), name


def test_without_lisa_every_parameter_trains_and_sgd_has_no_state():
    model = tiny_model("gpt2")
    engine = build_single_engine(model, OptimizerSpec(name="sgd", lr=LR), None)
    before = _snapshot(model)
    lm_loss(model, token_batch(0)).backward()
    engine.step(LR, None)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert engine.optimizer_state_bytes() == 0


def test_bad_arguments_raise(monkeypatch):
    engine = build_single_engine(tiny_model("llama"), OptimizerSpec(lr=LR),
                                 LisaConfig(**PAPER_LISA))
    with pytest.raises(ValueError, match="out of range"):
        engine.set_active_blocks([4])
    with pytest.raises(ValueError, match="clip"):
        engine.step(LR, 0.0)
    with pytest.raises(ValueError, match="OptimizerSpec.name"):
        OptimizerSpec(name="adam")
    # another test in this process may have left a process group up: pretend there is none
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="ddp=True"):
        build_single_engine(tiny_model("llama"), OptimizerSpec(), None, ddp=True)
    with pytest.raises(KeyError, match="model"):
        engine.load_state_dict({})


def test_ddp_two_ranks_matches_one_process(tmp_path: Path):
    out = tmp_path / "ddp.json"
    script = Path(__file__).parent / "dist_scripts" / "ddp_engine.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["ranks_reporting"] == [0, 1]
    assert result["ranks_identical"] and result["frozen_identical"]
    assert result["max_abs_diff_vs_single"] <= DDP_PARITY_RTOL * result["sgd_moved"]
    assert result["sgd_moved"] > 1e-2  # the parity run really trained
    assert result["state_bytes"] <= result["state_bound"]
