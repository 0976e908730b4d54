"""Two ranks (gloo) reproduce the one-rank run on every engine: the same global batch, split over
ranks, gives the same weights, with LISA switching blocks on the way; the run reports world size 2,
so a silent single-process fallback fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_reweight import TINY  # noqa: E402  (tests/llm is on sys.path under pytest)

from scalebio.llm.loop.setup import free_port
from scalebio.llm.tasks.demo_data import write_demo_sources

DIST_TOL = 1e-5  # float32 sums in a different order across ranks; trajectories of 4 steps


ENGINES = [
    pytest.param(["--engine.kind", "ddp"], id="ddp"),
    pytest.param(["--engine.kind", "fsdp2"], id="fsdp2"),
    pytest.param(["--engine.kind", "deepspeed", "--engine.zero_stage", "3"], id="zero3",
                 marks=pytest.mark.deepspeed),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_match_one_rank(tmp_path, engine):
    data = write_demo_sources(tmp_path / "data", seed=5, n_train_per_source=24, n_val=12,
                              corruption_rates=(1.0,), off_target=())
    raw = {
        "model": {"config": TINY, "tokenizer": "char"},
        "data": {"sources": data["sources"], "validation": [data["val"]], "max_length": 48,
                 "per_source": 4, "val_batch": 8, "micro_batches": 2,
                 "cache_dir": str(tmp_path / "cache")},
        "bilevel": {"steps": 4, "alpha": 1.0, "lr_u": 1e-2, "lr_w": 1e-2, "lr_lambda": 0.1},
        "lisa": {"enabled": True, "n_active": 1, "period": 2},  # switches at steps 0 and 2
        "run": {"seed": 2, "checkpoint_every": 0, "tracker": "none", "threads": 1},
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "scalebio", "reweight", "--config", str(cfg), "--out",
                    str(one), "--no-progress"], env=env, check=True, capture_output=True)
    two = tmp_path / "two"
    # micro_batches counts per rank: 2 ranks × 1 micro-batch = the same 2 chunks as above
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "scalebio", "reweight", "--config", str(cfg),
           "--out", str(two), "--no-progress", "--data.micro_batches", "1", *engine]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a = json.loads((one / "weights.json").read_text())
    b = json.loads((two / "weights.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["engine"] == engine[1]
    for name in a["weights"]:
        assert abs(a["weights"][name] - b["weights"][name]) < DIST_TOL, name
    assert max(abs(w - 0.5) for w in a["weights"].values()) > 1e-3  # the weights did move


def test_single_engine_refuses_several_ranks(tmp_path):
    data = write_demo_sources(tmp_path / "data", seed=5, n_train_per_source=8, n_val=4,
                              corruption_rates=(1.0,), off_target=())
    raw = {"model": {"config": TINY, "tokenizer": "char"},
           "data": {"sources": data["sources"], "validation": [data["val"]], "max_length": 48,
                    "per_source": 2, "val_batch": 2, "cache_dir": str(tmp_path / "cache")},
           "bilevel": {"steps": 1}, "run": {"tracker": "none", "threads": 1}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "scalebio", "reweight", "--config", str(cfg),
           "--out", str(tmp_path / "out"), "--no-progress"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and "engine.kind: 'single' runs one process" in res.stderr
