"""Checkpoints resume at another world size (llm/loop/checkpoint.py; docs/engines.md,
"Checkpoints"): a run saved by 2 ranks (fsdp2, ddp) continues on 1 rank (engine.kind single)
along the trajectory of the uninterrupted 2-rank run, and a 1-rank run continues on 2 ranks.
Per-rank states (DeepSpeed's, and every engine's in earlier versions) load at the world size that
wrote them and name both sizes otherwise; engine.kind may change only between the torch engines
at the same precision."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_reweight import TINY  # tests/llm is on sys.path under pytest
from tiny_models import PAPER_LISA, lm_loss, tiny_model, token_batch

from scalebio.llm.cli import reweight_main
from scalebio.llm.config import ConfigError
from scalebio.llm.engines.engine import OptimizerSpec
from scalebio.llm.engines.lisa import LisaConfig
from scalebio.llm.engines.torch_engine import build_single_engine
from scalebio.llm.loop import checkpoint, resume_config
from scalebio.llm.loop.setup import free_port
from scalebio.llm.tasks.demo_data import write_demo_sources

# The tiny model runs in float32 (model.dtype refuses float64). After the resume the same global
# batch is summed in another grouping: one rank accumulates both micro-batches where two ranks
# all-reduced one each, and norms are taken over whole tensors instead of shards (or the other
# way round). That changes float32 roundings only: measured at most 9.7e-8 relative to 1 + |value|
# (4.8e-7 on grad_norm_w ≈ 4.4; 8e-8 on the weights) over the 2 resumed steps. TOL leaves 100×
# that, and is over 1000× below what a resume that lost the Adam moments does to the same run
# (measured: 3.8e-2 on grad_norm_w, 1.7e-3 on the weights).
TOL = 1e-5
STEPS, SAVED_AT = 4, 2  # checkpoints at steps 2 and 4; the resume starts from step 2


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ws")
    data = write_demo_sources(root / "data", seed=5, n_train_per_source=24, n_val=12,
                              corruption_rates=(1.0,), off_target=())
    k = len(data["sources"])
    raw = {
        "model": {"config": TINY, "tokenizer": "char"},
        # B = 4k sequences in chunks of 2k: 2 ranks forward one chunk each, 1 rank both in turn
        # (the same chunks, so the config need not change with the world size)
        "data": {"sources": data["sources"], "validation": [data["val"]], "max_length": 48,
                 "per_source": 4, "val_batch": 8, "micro_batch_size": 2 * k,
                 "cache_dir": str(root / "cache")},
        "bilevel": {"steps": STEPS, "alpha": 1.0, "lr_u": 1e-2, "lr_w": 1e-2, "lr_lambda": 0.1},
        "lisa": {"enabled": True, "n_active": 1, "period": 2},  # a draw at the resumed step
        "run": {"seed": 2, "checkpoint_every": SAVED_AT, "keep_checkpoints": 2,
                "tracker": "none", "threads": 1},
    }
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def _two_ranks(cfg: Path, out: Path, *flags: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "scalebio", "reweight", "--config", str(cfg),
           "--out", str(out), "--no-progress", *flags]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _one_rank(cfg: Path, out: Path, *flags: str) -> None:
    assert reweight_main(["--config", str(cfg), "--out", str(out), "--no-progress", *flags]) == 0


def _interrupted(ref: Path, out: Path) -> None:
    """``out`` as a run of ``ref``'s killed after its checkpoint at SAVED_AT would leave it."""
    name = f"step_{SAVED_AT:08d}"
    shutil.copytree(ref / "checkpoints" / name, out / "checkpoints" / name)


def _rows(out: Path) -> list[dict]:
    with open(out / "trajectory.csv") as f:
        return [{k: float(v) for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _check_same_run(resumed: Path, ref: Path, world: int, kinds: list[str]) -> float:
    """Steps before the checkpoint identical (restored), later ones within TOL; returns the
    largest relative difference."""
    a, b = _rows(resumed), _rows(ref)
    assert len(a) == len(b) == STEPS
    assert a[:SAVED_AT] == b[:SAVED_AT]
    worst = max(abs(x[k] - y[k]) / (1 + abs(y[k])) for x, y in zip(a, b) for k in y)
    assert worst <= TOL, worst
    wa, wb = (json.loads((p / "weights.json").read_text()) for p in (resumed, ref))
    assert wa["world_size"] == world and wa["engine"] == kinds[1]
    for key in ("weights", "averaged_weights"):
        assert all(abs(wa[key][n] - wb[key][n]) <= TOL for n in wb[key]), key
    assert max(abs(w - 0.5) for w in wb["weights"].values()) > 1e-3  # λ did move
    log = json.loads((resumed / "resume_log.jsonl").read_text().splitlines()[-1])
    assert log["changed"] == {"engine.kind": kinds}
    return worst


@pytest.mark.parametrize("kind", ["fsdp2", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_ranks_resume_on_one(tmp_path, config, kind):
    ref = tmp_path / "ref"
    _two_ranks(config, ref, "--engine.kind", kind)
    saved = json.loads((ref / "checkpoints" / f"step_{SAVED_AT:08d}" / "engines.json").read_text())
    assert saved["world_size"] == 2 and {e["format"] for e in saved["engines"].values()} == {"dcp"}
    out = tmp_path / "resumed"
    _interrupted(ref, out)
    _one_rank(config, out, "--resume")  # the config's engine.kind: single
    _check_same_run(out, ref, 1, [kind, "single"])


@pytest.mark.slow
def test_one_rank_resumes_on_two(tmp_path, config):
    ref = tmp_path / "ref"
    _one_rank(config, ref)
    out = tmp_path / "resumed"
    _interrupted(ref, out)
    _two_ranks(config, out, "--resume", "--engine.kind", "fsdp2")
    _check_same_run(out, ref, 2, ["single", "fsdp2"])


# ------------------------------------------------------------------ in one process, no launcher
def _trained(dtype=torch.float32, layers: int = 4):
    """A single engine after 2 LISA steps (AdamW moments, and fp32 masters in bf16)."""
    engine = build_single_engine(tiny_model("llama", seed=1, num_layers=layers, dtype=dtype),
                                 OptimizerSpec(lr=1e-2),
                                 LisaConfig(n_active=1, period=2, **PAPER_LISA))
    engine.set_active_blocks([2])
    for step in range(2):
        lm_loss(engine.module, token_batch(step)).backward()
        engine.step(1e-2, None)
    return engine


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("layout", ["dcp", "per_rank_v1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_round_trip_is_bitwise(tmp_path, layout, dtype):
    """The engine state comes back bit for bit, from this version's layout and from the per-rank
    files of earlier versions (at their world size); the reference is the saving engine."""
    engine = _trained(dtype)
    loop = {"step": 2, "torch_rng": torch.get_rng_state()}
    if layout == "dcp":
        ck = checkpoint.save_checkpoint(tmp_path, 2, loop, {"u": engine}, 0, keep=1)
        assert checkpoint.newest_intact(tmp_path) == ck
    else:  # what earlier versions wrote: torch.save of each engine's state per rank
        ck = tmp_path / "step_00000002"
        ck.mkdir()
        torch.save(engine.state_dict(), ck / "u_rank0.pt")
        torch.save(loop, ck / "loop.pt")
    fresh = build_single_engine(tiny_model("llama", seed=7, dtype=dtype), OptimizerSpec(lr=1e-2),
                                LisaConfig(n_active=1, period=2, **PAPER_LISA))
    assert checkpoint.load_checkpoint(ck, {"u": fresh}, 0)["step"] == 2
    assert _equal(fresh.state_dict(), engine.state_dict())
    assert (dtype == torch.bfloat16) == bool(fresh.state_dict()["masters"])  # masters exercised


def test_damaged_shard_falls_back_and_misfit_model_is_named(tmp_path, caplog):
    engine = _trained()
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, {"step": step}, {"u": engine}, 0, keep=2)
    shard = next((tmp_path / "step_00000002" / checkpoint.DCP_DIR).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert checkpoint.newest_intact(tmp_path) == tmp_path / "step_00000001"
    assert "step_00000002 is damaged" in caplog.text and shard.name in caplog.text
    small = build_single_engine(tiny_model("llama", num_layers=3), OptimizerSpec(),
                                LisaConfig(n_active=1, period=2, **PAPER_LISA))
    with pytest.raises(ConfigError, match=r"state of u does not fit.*layers\.3.*not in this"):
        checkpoint.load_checkpoint(tmp_path / "step_00000001", {"u": small}, 0)


def _per_rank_checkpoint(ck: Path, manifest: dict | None) -> Path:
    ck.mkdir(parents=True)
    for name in ("u", "w"):
        for rank in (0, 1):
            (ck / f"{name}_rank{rank}.pt").write_bytes(b"")
    if manifest is not None:
        (ck / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return ck


@pytest.mark.parametrize("saved_by", ["deepspeed", "earlier_version"])
def test_per_rank_states_name_both_world_sizes(tmp_path, saved_by):
    manifest = {"format": checkpoint.FORMAT, "world_size": 2,
                "engines": {n: {"format": "per_rank", "kind": "ZeroEngine"} for n in "uw"}}
    ck = _per_rank_checkpoint(tmp_path / "step_00000002",
                              manifest if saved_by == "deepspeed" else None)
    what = "ZeroEngine" if saved_by == "deepspeed" else "an earlier scalebio version"
    with pytest.raises(ConfigError, match=rf"\({what}\) written by 2 rank\(s\).* this run has 1"):
        checkpoint.check_world_size(ck)
    with pytest.raises(ConfigError, match=r"Relaunch with 2 rank\(s\)"):
        checkpoint.load_checkpoint(ck, {}, 0)


@pytest.mark.parametrize("change, bf16, ok", [
    (("ddp", "single"), False, True),
    (("fsdp2", "single"), False, True),
    (("single", "fsdp2"), False, True),
    (("ddp", "single"), True, True),  # neither casts to bf16
    (("fsdp2", "ddp"), True, False),  # fsdp2 ran in bf16, ddp would not
    (("deepspeed", "fsdp2"), False, False),  # another checkpoint format
    (("fsdp2", "deepspeed"), False, False),
])
def test_engine_kind_changes_a_resume_accepts(change, bf16, ok):
    changes = {"engine.kind": change, "data.world_size": (2, 1)}
    refused = resume_config.refused_changes(changes, {"engine.bf16": bf16})
    assert refused == ({} if ok else {"engine.kind": change})
    assert "engine.kind" in resume_config.refused_changes({"engine.kind": ("fsdp2", "single")})


def test_earlier_fsdp2_checkpoint_loads_only_under_fsdp2(tmp_path, one_rank_group):
    """An earlier version's per-rank file holds FSDP2's DTensor shards: an fsdp2 engine loads it
    bit for bit, a single engine is told which engine.kind wrote it."""
    from scalebio.llm.engines.torch_engine import build_fsdp2_engine

    lisa, spec = LisaConfig(n_active=1, period=2, **PAPER_LISA), OptimizerSpec(lr=1e-2)
    saving = build_fsdp2_engine(tiny_model("llama", seed=1), spec, lisa)
    saving.set_active_blocks([1])
    lm_loss(saving.module, token_batch(0)).backward()
    saving.step(1e-2, None)
    ck = tmp_path / "step_00000001"
    ck.mkdir()
    torch.save(saving.state_dict(), ck / "u_rank0.pt")
    torch.save({"step": 1}, ck / "loop.pt")
    loading = build_fsdp2_engine(tiny_model("llama", seed=7), spec, lisa)
    checkpoint.load_checkpoint(ck, {"u": loading}, 0)
    local = {k: v.to_local() if hasattr(v, "to_local") else v
             for k, v in loading.state_dict()["model"].items()}
    assert _equal(local, {k: v.to_local() for k, v in saving.state_dict()["model"].items()})
    single = build_single_engine(tiny_model("llama", seed=7), spec, lisa)
    with pytest.raises(ConfigError, match="per-rank checkpoint of fsdp2 loads only under"):
        checkpoint.load_checkpoint(ck, {"u": single}, 0)
