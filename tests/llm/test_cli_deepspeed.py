"""The real CLI with ``--engine.kind deepspeed`` and no ``DS_ACCELERATOR``: DeepSpeed must pick its
accelerator by itself whatever ``CUDA_VISIBLE_DEVICES`` says (a CLI that forced one at import
broke GPU runs), and importing the CLI or the DeepSpeed engine must not touch the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_reweight import TINY  # tests/llm is on sys.path under pytest

from scalebio.llm.tasks.demo_data import write_demo_sources

# What a plain shell would not have: the DeepSpeed fixture of this session sets DS_ACCELERATOR,
# launchers set the rest. CUDA_VISIBLE_DEVICES is set per case below.
SCRUB = ("DS_ACCELERATOR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
         "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
WEIGHT_SUM_TOL = 1e-12  # weights.json is written from float64 and renormalised


def plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_deepspeed")
    data = write_demo_sources(root / "data", seed=5, n_train_per_source=8, n_val=4,
                              corruption_rates=(1.0,), off_target=())
    raw = {
        "model": {"config": TINY, "tokenizer": "char"},
        "data": {"sources": data["sources"], "validation": [data["val"]], "max_length": 48,
                 "per_source": 2, "val_batch": 2, "micro_batches": 1,
                 "cache_dir": str(root / "cache")},
        "bilevel": {"steps": 5, "alpha": 1.0, "lr_u": 1e-2, "lr_w": 1e-2, "lr_lambda": 0.1},
        "lisa": {"enabled": True, "n_active": 1, "period": 1},  # a ZeRO rebuild at step 1
        "run": {"seed": 0, "checkpoint_every": 0, "tracker": "none", "threads": 1},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.deepspeed
@pytest.mark.parametrize("cuda_visible", [None, "", "0"], ids=["unset", "empty", "zero"])
def test_cli_deepspeed_runs_without_ds_accelerator(config, tmp_path, cuda_visible):
    extra = {} if cuda_visible is None else {"CUDA_VISIBLE_DEVICES": cuda_visible}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "scalebio", "reweight", "--config", str(config), "--out",
           str(out), "--no-progress", "--engine.kind", "deepspeed", "--bilevel.steps", "2"]
    proc = subprocess.run(cmd, env=plain_env(**extra), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads((out / "weights.json").read_text())
    assert (doc["engine"], doc["steps"], doc["world_size"]) == ("deepspeed", 2, 1)
    assert abs(sum(doc["weights"].values()) - 1.0) <= WEIGHT_SUM_TOL


def test_importing_the_cli_and_the_deepspeed_engine_changes_no_environment():
    """Not even through DeepSpeed, which sets a variable when imported: the engine module
    imports it only when an engine is built."""
    code = (
        "import gc, json, os, sys\n"
        "before = dict(os.environ)\n"
        "import scalebio.llm.cli, scalebio.llm.engines.deepspeed_zero\n"
        "changed = sorted(k for k in set(before) | set(os.environ)\n"
        "                 if before.get(k) != os.environ.get(k))\n"
        "print(json.dumps({'changed': changed, 'deepspeed': 'deepspeed' in sys.modules,\n"
        "                  'frozen': gc.get_freeze_count()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=plain_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"changed": [], "deepspeed": False, "frozen": 0}
