"""DeepSpeed ZeRO-2/3 engine with LISA: 1 rank in-process (gloo) and one 2-rank subprocess test;
the supported-release gate and the scoping of the DeepSpeed workarounds (docs/engines.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import (
    PAPER_LISA,
    block_prefix,
    lm_loss,
    reference_lisa_step,
    reference_step,
    tiny_model,
)
from tiny_models import token_batch as batch

from scalebio.llm.engines.engine import OptimizerSpec, live_tensor_bytes
from scalebio.llm.engines.lisa import LisaConfig

pytestmark = pytest.mark.deepspeed
STAGES = [2, 3]
LR, SGD_LR, CLIP = 1e-3, 0.5, 0.05
BF16_LR = 1e-2  # an Adam step must exceed bf16's resolution (2^-8 relative) to be visible
ADAM = OptimizerSpec(lr=LR)
LISA = LisaConfig(n_active=1, period=2, **PAPER_LISA)
# Period-2 schedules (explicit, so the test conditions hold): u re-activates block 0 at step 4.
SCHED = {"u": [[0], [0], [2], [2], [0], [0]], "w": [[1, 3], [1, 3], [2], [2], [1, 3], [1, 3]]}
# DeepSpeed's default 5e8-element buckets are 2 GB (virtual) buffers per engine; tiny is enough.
# ZeRO-3 keeps params under the persistence threshold gathered: 100 splits norms from matrices.
ZERO = {"reduce_bucket_size": 2**20, "allgather_bucket_size": 2**20,
        "stage3_prefetch_bucket_size": 2**20, "stage3_param_persistence_threshold": 100}
# LISA state may exceed (persistent + active share) of the all-blocks state by 1% of the latter:
# room for DeepSpeed's partition padding and `step` scalars, far below one block (~10% here).
BYTES_SLACK = 0.01
LEAK_SWITCHES = 12
# ZeRO-3 computes fp32 grads in another summation order (≤ 5e-8 apart, measured with SGD), which
# AdamW's m/(√v + ε) can amplify on near-zero grads. Measured over the 6 steps: loss 9.5e-7,
# weights 1.1e-6; a wrong freeze/carry/accumulation shows up as ≥ one Adam step, lr = 1e-3.
Z3_LOSS_TOL = 1e-5
Z3_WEIGHT_TOL = 1e-4
# DeepSpeedCPUAdam has its own fp32 arithmetic: measured 3.1e-6 (ZeRO-2), 5.3e-6 (ZeRO-3) from
# torch AdamW over 6 steps; a freeze/carry bug is ≥ one Adam step, lr = 1e-3.
OFFLOAD_WEIGHT_TOL = 1e-4
NORM_RTOL = 1e-6  # ZeRO sums squares per flat partition, torch per tensor: another order
CLIP_RTOL = 1e-6  # ZeRO scales grads by 1/((‖g‖+1e-6)/c), torch by c/(‖g‖+1e-6): 1 ulp apart


@pytest.fixture(autouse=True, scope="module")
def _fast_switches():
    """Each LISA switch ends in gc.collect(): skip the objects alive before this module's tests
    (scoped: unfrozen after them)."""
    from scalebio.llm.engines.deepspeed_zero import frozen_gc

    with frozen_gc():
        yield


def build(stage, spec=ADAM, lisa=LISA, seed=0):
    from scalebio.llm.engines.deepspeed_zero import build_deepspeed_engine

    return build_deepspeed_engine(tiny_model("llama", seed=seed), spec, lisa, stage,
                                  zero_config=ZERO)


def numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned param holds no data


def block_of(name: str) -> int | None:
    prefix = block_prefix()
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def surrogate(u, w, step: int, mb: int) -> torch.Tensor:
    """Loss shaped like the loop's: u once, w on a train and a validation micro-batch."""
    train, val = batch(100 * step + mb), batch(100 * step + 50 + mb)
    return lm_loss(u, train) + 0.5 * lm_loss(w, train) + lm_loss(w, val)


def check_moves(before: dict, after: dict, active: list[int], where: str) -> None:
    for name, old in before.items():
        blk = block_of(name)
        if blk is None or blk in active:
            assert not torch.equal(old, after[name]), f"{where}: trainable {name} did not move"
        else:
            assert torch.equal(old, after[name]), f"{where}: frozen {name} moved"


@pytest.mark.parametrize("stage", STAGES)
def test_lisa_two_engines_match_plain_torch(deepspeed_dist, stage):
    """One backward through u and w per micro-batch (2 micro-batches), LISA switches every 2
    steps; frozen blocks bit-identical after every step, trainable ones move, and the
    trajectory matches a plain-torch LISA loop that carries only the persistent params' state."""
    eu, ew = build(stage), build(stage)
    ref = {"u": tiny_model("llama"), "w": tiny_model("llama")}
    ref_state = {"u": {}, "w": {}}
    prev = {"u": eu.full_model_state_dict(), "w": ew.full_model_state_dict()}
    losses, ref_losses, norms, ref_norms = [], [], [], []
    for step in range(len(SCHED["u"])):
        for key, engine in (("u", eu), ("w", ew)):
            engine.set_active_blocks(SCHED[key][step])
            reference_lisa_step(ref[key], ref_state[key], SCHED[key][step], LR, block_prefix(),
                                {"weight_decay": 0.0})
        for mb in range(2):
            loss = surrogate(eu.module, ew.module, step, mb)
            loss.backward()
            losses.append(loss.item())
            del loss  # a held loss keeps the engine alive across a switch
            ref_loss = surrogate(ref["u"], ref["w"], step, mb)
            ref_loss.backward()
            ref_losses.append(ref_loss.item())
        norms += [eu.step(LR, None), ew.step(LR, None)]
        ref_norms += [reference_step(ref_state[k], LR, None) for k in "uw"]
        now = {"u": eu.full_model_state_dict(), "w": ew.full_model_state_dict()}
        for key in "uw":
            check_moves(prev[key], now[key], SCHED[key][step], f"stage {stage} {key} step {step}")
        prev = now
    for key in "uw":
        for name, value in ref[key].state_dict().items():
            if stage == 2:  # same fp32 ops in the same order: bit-exact
                assert torch.equal(prev[key][name], value), f"{key} {name}"
            else:
                torch.testing.assert_close(prev[key][name], value, rtol=0, atol=Z3_WEIGHT_TOL)
    torch.testing.assert_close(norms, ref_norms, rtol=NORM_RTOL, atol=0)
    if stage == 2:
        assert losses == ref_losses
    else:
        torch.testing.assert_close(losses, ref_losses, rtol=0, atol=Z3_LOSS_TOL)


# Period-2 draws of 2 blocks: block 1 stays drawn over steps 0-3 and block 2 over steps 2-5
# (their masters and moments are carried across the rebuild), block 0 returns at step 4.
SCHED_CARRY = [[0, 1], [0, 1], [1, 2], [1, 2], [0, 2], [0, 2]]


@pytest.mark.parametrize("stage", STAGES)
def test_block_drawn_again_keeps_its_state(deepspeed_dist, stage):
    """Rebuild per switch, one param group per block: the trajectory matches the plain-torch
    loop whose AdamW state survives for blocks drawn again and restarts after an absence."""
    engine, ref, ref_state = build(stage), tiny_model("llama"), {}
    for step, active in enumerate(SCHED_CARRY):
        engine.set_active_blocks(active)
        reference_lisa_step(ref, ref_state, active, LR, block_prefix(), {"weight_decay": 0.0})
        lm_loss(engine.module, batch(step)).backward()
        engine.step(LR, None)
        lm_loss(ref, batch(step)).backward()
        reference_step(ref_state, LR, None)
        if step == 3:  # blocks 1 and 2 (groups 1 and 2): 4 and 2 steps of moments
            steps = [int(g["state"]["step"]) for g in engine.state_dict()["groups"]]
            assert steps[-2:] == [4, 2], steps
    now = engine.full_model_state_dict()
    for name, value in ref.state_dict().items():
        if stage == 2:  # same fp32 ops in the same order: bit-exact
            assert torch.equal(now[name], value), name
        else:  # a lost or stale moment is an Adam step (lr = 1e-3) off: ≥ 10 × the tolerance
            torch.testing.assert_close(now[name], value, rtol=0, atol=Z3_WEIGHT_TOL, msg=name)


def _persistent_entry(engine) -> dict:
    return engine.state_dict()["groups"][0]


@pytest.mark.parametrize("stage", STAGES)
def test_state_bytes_carry_and_no_leak(deepspeed_dist, stage):
    engine = build(stage)
    engine.set_active_blocks(None)  # the full baseline: every block trainable
    lm_loss(engine.module, batch(0)).backward()
    engine.step(LR, None)
    full_bytes = engine.optimizer_state_bytes()
    layout = engine.layout
    block = sum(numel(p) for p in layout.blocks[0])
    total = sum(numel(p) for p in engine.model.parameters())
    share = (total - (len(layout.blocks) - 1) * block) / total  # persistent + 1 block
    live = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # the old engine must be freed
        for k in range(LEAK_SWITCHES):
            before = _persistent_entry(engine)
            engine.set_active_blocks([k % len(layout.blocks)])
            after = _persistent_entry(engine)  # embeddings/head master + moments + step kept
            torch.testing.assert_close(after, before, rtol=0, atol=0)
            lm_loss(engine.module, batch(k + 1)).backward()
            engine.step(LR, None)
            assert engine.optimizer_state_bytes() <= (share + BYTES_SLACK) * full_bytes
            live.append(live_tensor_bytes())
    assert int(before["state"]["step"]) == k + 1  # one step per switch, plus the baseline's
    assert len(set(live[1:])) == 1, f"live tensor bytes drift over switches: {live}"


def test_held_loss_across_a_switch_warns(deepspeed_dist):
    engine = build(2)
    engine.set_active_blocks([0])
    held = lm_loss(engine.module, batch(0))  # its graph holds a DeepSpeed hook closure
    with pytest.warns(ResourceWarning, match="still referenced"):
        engine.set_active_blocks([1])
    del held


@pytest.mark.parametrize("stage", STAGES)
def test_state_dict_round_trip(deepspeed_dist, stage, tmp_path):
    """Save mid-run (one file per rank), load into a differently initialised engine, continue:
    bit-identical to the uninterrupted run, including a switch after the resume."""
    schedule = [[0], [0], [1], [1], [3]]
    a = build(stage)

    def train(engine, steps):
        for step in steps:
            engine.set_active_blocks(schedule[step])
            lm_loss(engine.module, batch(step)).backward()
            engine.step(LR, CLIP)

    train(a, range(3))
    torch.save(a.state_dict(), tmp_path / "u_rank0.pt")
    train(a, range(3, 5))
    b = build(stage, seed=1)
    b.load_state_dict(torch.load(tmp_path / "u_rank0.pt", weights_only=False))
    assert b.active == [1]
    train(b, range(3, 5))
    torch.testing.assert_close(b.full_model_state_dict(), a.full_model_state_dict(), rtol=0,
                               atol=0)
    torch.testing.assert_close(b.state_dict()["groups"], a.state_dict()["groups"], rtol=0,
                               atol=0)


def test_bf16_tied_embeddings_freeze_and_round_trip(deepspeed_dist):
    """ZeRO-3, bf16 weights with fp32 masters, input/output embeddings tied."""
    from scalebio.llm.engines.deepspeed_zero import build_deepspeed_engine

    def make(seed):
        return build_deepspeed_engine(tiny_model("llama", seed=seed, tie=True), ADAM, LISA, 3,
                                      bf16=True, zero_config=ZERO)

    a = make(0)
    prev = a.full_model_state_dict()
    for step, active in enumerate([[0], [0], [2]]):
        a.set_active_blocks(active)
        lm_loss(a.module, batch(step)).backward()
        a.step(BF16_LR, None)
        now = a.full_model_state_dict()
        check_moves(prev, now, active, f"bf16 step {step}")
        prev = now
    assert {v.dtype for v in now.values()} == {torch.bfloat16}
    b = make(1)
    b.load_state_dict(a.state_dict())
    for engine in (a, b):
        engine.set_active_blocks([1])
        lm_loss(engine.module, batch(9)).backward()
        engine.step(BF16_LR, None)
    torch.testing.assert_close(b.full_model_state_dict(), a.full_model_state_dict(), rtol=0,
                               atol=0)


@pytest.mark.parametrize("stage", STAGES)
def test_clipping_and_norm_match_torch(deepspeed_dist, stage):
    engine = build(stage, OptimizerSpec(name="sgd", lr=SGD_LR), None)
    ref = tiny_model("llama")
    lm_loss(engine.module, batch(0)).backward()
    norm = engine.step(SGD_LR, CLIP)
    lm_loss(ref, batch(0)).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
    assert norm > 10 * CLIP  # the clip is active
    torch.testing.assert_close(norm, float(ref_norm), rtol=CLIP_RTOL, atol=0)
    with torch.no_grad():
        for p in ref.parameters():
            p -= SGD_LR * p.grad
    # ≤ 1 ulp of the clip coefficient times SGD_LR·|g| ≈ 1e-9 here
    torch.testing.assert_close(engine.full_model_state_dict(), ref.state_dict(),
                               rtol=CLIP_RTOL, atol=1e-8)


@pytest.mark.slow  # the first use JIT-builds DeepSpeed's cpu_adam op (about 50 s cold)
@pytest.mark.parametrize("stage", STAGES)
def test_offload_lisa_matches_torch_and_round_trips(deepspeed_dist, stage):
    from scalebio.llm.engines.deepspeed_zero import build_deepspeed_engine

    def make(seed):
        return build_deepspeed_engine(tiny_model("llama", seed=seed), ADAM, LISA, stage,
                                      offload=True, zero_config=ZERO)

    engine, ref, ref_state = make(0), tiny_model("llama"), {}
    prev = engine.full_model_state_dict()
    for step, active in enumerate(SCHED["u"]):
        engine.set_active_blocks(active)
        reference_lisa_step(ref, ref_state, active, LR, block_prefix(), {"weight_decay": 0.0})
        lm_loss(engine.module, batch(step)).backward()
        engine.step(LR, None)
        lm_loss(ref, batch(step)).backward()
        reference_step(ref_state, LR, None)
        now = engine.full_model_state_dict()
        check_moves(prev, now, active, f"offload stage {stage} step {step}")
        prev = now
    torch.testing.assert_close(now, ref.state_dict(), rtol=0, atol=OFFLOAD_WEIGHT_TOL)
    other = make(1)
    other.load_state_dict(engine.state_dict())
    for e in (engine, other):
        e.set_active_blocks([1])
        lm_loss(e.module, batch(9)).backward()
        e.step(LR, None)
    torch.testing.assert_close(other.full_model_state_dict(), engine.full_model_state_dict(),
                               rtol=0, atol=0)


def test_bad_arguments_are_named():
    from scalebio.llm.engines.deepspeed_zero import (
        FORMAT,
        build_deepspeed_engine,
        deepspeed_config,
    )

    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(1, False, False)
    with pytest.raises(ValueError, match="zero_config"):
        deepspeed_config(3, False, False, {"offload_optimizer": {"device": "cpu"}})
    engine = build_deepspeed_engine(tiny_model("llama"), ADAM, LISA, 2)
    with pytest.raises(ValueError, match="lr"):
        engine.step(-1.0, None)
    with pytest.raises(ValueError, match="clip"):
        engine.step(LR, 0.0)
    with pytest.raises(ValueError, match="out of range"):
        engine.set_active_blocks([7])
    with pytest.raises(KeyError, match="missing the field"):
        engine.load_state_dict({"format": FORMAT, "zero_stage": 2})
    bad = {"format": FORMAT, "zero_stage": 3, "world_size": 1, "active": None,
           "params": {}, "groups": []}
    with pytest.raises(ValueError, match="zero_stage"):
        engine.load_state_dict(bad)
    with pytest.raises(ValueError, match="format"):  # v1 held all active blocks in one group
        engine.load_state_dict({**bad, "format": "scalebio-deepspeed-v1", "zero_stage": 2})


@pytest.mark.parametrize("version", ["0.16.9", "0.19.3", "0.20.0", "0.20.0rc1", "1.0.0", "dev"])
def test_unsupported_deepspeed_is_refused(version, monkeypatch):
    """The workarounds touch DeepSpeed internals checked on one range of releases only; outside
    it they could silently do nothing, so building an engine there fails, naming the range."""
    deepspeed = pytest.importorskip("deepspeed")
    from scalebio.llm.engines.deepspeed_zero import build_deepspeed_engine, check_deepspeed_version

    with pytest.raises(RuntimeError, match=r"deepspeed>=0\.19\.4,<0\.20\.0"):
        check_deepspeed_version(version)
    monkeypatch.setattr(deepspeed, "__version__", version)
    with pytest.raises(RuntimeError, match=f"deepspeed {re.escape(version)} is not supported"):
        build_deepspeed_engine(tiny_model("llama"), ADAM, LISA, 2)


def test_installed_deepspeed_is_supported():
    """Fails loudly (with the supported range) when the environment has another DeepSpeed."""
    pytest.importorskip("deepspeed")
    from scalebio.llm.engines.deepspeed_zero import check_deepspeed_version

    check_deepspeed_version()
    for version in ("0.19.4", "0.19.8+cu124", "0.19.99"):
        assert check_deepspeed_version(version) == version


def test_pyproject_pin_is_the_supported_range():
    """pip must not install a DeepSpeed that building an engine would then refuse."""
    from scalebio.llm.engines.deepspeed_zero import SUPPORTED_DEEPSPEED

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    pin = re.search(r'"deepspeed>=([0-9.]+),<([0-9.]+)"', text)
    assert pin, "pyproject.toml: no deepspeed>=…,<… pin in the llm extra"
    lo, hi = ((tuple(int(x) for x in v.split(".")) + (0, 0))[:3] for v in pin.groups())
    assert (lo, hi) == SUPPORTED_DEEPSPEED


def test_workarounds_stay_scoped(deepspeed_dist):
    """The shm-op skip lasts only while the comm backend is created (the op was not built, and
    DeepSpeed's builder is back), and the backward-prologue patch sits on the engine instance,
    not on DeepSpeedEngine."""
    import importlib

    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.engine import DeepSpeedEngine

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    assert comm_torch.build_shm_op.__qualname__ == "build_shm_op"  # DeepSpeed's own function
    if get_accelerator().device_name() == "cpu":
        assert deepspeed_dist.comm.comm.cdb.shm_comm_op is None
    original = DeepSpeedEngine._backward_prologue
    ds = build(2).module
    assert DeepSpeedEngine._backward_prologue is original
    assert ds._backward_prologue.__qualname__.endswith("prologue_once_per_backward.<locals>.once")


def test_frozen_gc_is_scoped_and_leaves_other_freezes_alone():
    """gc.freeze() is process-wide: frozen_gc() undoes its own on exit, and is a no-op inside
    someone else's freeze (a subprocess: this module runs inside a frozen_gc block)."""
    code = (
        "import gc, json\n"
        "from scalebio.llm.engines.deepspeed_zero import frozen_gc\n"
        "out = {'start': gc.get_freeze_count()}\n"
        "with frozen_gc():\n"
        "    out['inside'] = gc.get_freeze_count()\n"
        "out['after'] = gc.get_freeze_count()\n"
        "gc.freeze()\n"
        "theirs = gc.get_freeze_count()\n"
        "with frozen_gc():\n"
        "    out['nested'] = gc.get_freeze_count() - theirs\n"
        "out['theirs_after'] = gc.get_freeze_count() - theirs\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["start"] == 0 and out["inside"] > 0 and out["after"] == 0, out
    assert out["nested"] == 0 and out["theirs_after"] == 0, out


def test_deepspeed_two_ranks(tmp_path: Path):
    script = Path(__file__).parent / "dist_scripts" / "ds_engine.py"
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    for stage in ("2", "3"):
        assert result[stage]["parity_max_rel"] <= result["tolerance"], result
        assert result[stage]["bytes_ratio"] <= result[stage]["bytes_bound"], result
    # ZeRO-3 built partitioned from a deferred model = today's path, every local partition
    assert result["deferred_same"] == [[True] * 3] * 2, result
