"""End to end: `scalebio reweight` writes its outputs, refuses what it must, and a run killed with
SIGKILL at a random step resumes to the same trajectory, bit for bit."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scalebio.llm.cli import reweight_main
from scalebio.llm.data.tokenizer import CHAR_SPECIAL_TOKENS, char_vocab
from scalebio.llm.tasks.demo_data import write_demo_sources

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "vocab_size": len(char_vocab()),
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
assert CHAR_SPECIAL_TOKENS[:3] == ("<pad>", "<s>", "</s>")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_demo_sources(
        d,
        seed=3,
        n_train_per_source=40,
        n_val=16,
        corruption_rates=(0.5, 1.0),
        off_target=("prose",),
    )


def _config(tmp: Path, sources: dict, steps: int = 6, **bilevel) -> Path:
    raw = {
        "model": {"config": TINY, "tokenizer": "char"},
        "data": {
            "sources": sources["sources"],
            "validation": [sources["val"]],
            "max_length": 48,
            "per_source": 4,
            "val_batch": 8,
            "micro_batches": 2,
            "cache_dir": str(tmp / "cache"),
        },
        "bilevel": {
            "steps": steps,
            "alpha": 1.0,
            "lr_u": 1e-2,
            "lr_w": 1e-2,
            "lr_lambda": 0.1,
            **bilevel,
        },
        "run": {"seed": 1, "checkpoint_every": 1, "tracker": "none", "threads": 1},
    }
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _rows(out: Path) -> list[dict]:
    with open(out / "trajectory.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_reweight_writes_outputs_and_refuses_to_overwrite(tmp_path, sources, capsys):
    cfg = _config(tmp_path, sources, steps=4)
    out = tmp_path / "run"
    assert reweight_main(["--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "weights.json").read_text())
    names = [s["name"] for s in sources["sources"]]
    assert list(doc["weights"]) == names  # keyed by name, in config order
    assert abs(sum(doc["weights"].values()) - 1) < 1e-9
    assert abs(sum(doc["averaged_weights"].values()) - 1) < 1e-9
    assert len(_rows(out)) == 4
    assert (out / "weights.png").stat().st_size > 0 and (out / "losses.png").stat().st_size > 0
    before = (out / "weights.json").read_bytes()
    capsys.readouterr()
    assert reweight_main(["--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "weights.json").read_bytes() == before  # nothing lost
    assert (
        reweight_main(
            [
                "--config",
                str(cfg),
                "--out",
                str(out),
                "--no-progress",
                "--overwrite",
                "--bilevel.steps",
                "2",
            ]
        )
        == 0
    )
    assert len(_rows(out)) == 2


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "scalebio", "reweight", *args, "--no-progress"]


def test_sigkill_then_resume_gives_the_same_trajectory(tmp_path, sources):
    steps = 8
    cfg = _config(tmp_path, sources, steps=steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(
        _cli(["--config", str(cfg), "--out", str(ref)]), env=env, check=True, capture_output=True
    )
    kill_at = 3 + int.from_bytes(os.urandom(1), "little") % 3  # a random step in 3..5
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(["--config", str(cfg), "--out", str(out)]),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (out / "checkpoints" / f"step_{kill_at:08d}").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "weights.json").exists()
    subprocess.run(
        _cli(["--config", str(cfg), "--out", str(out), "--resume"]),
        env=env,
        check=True,
        capture_output=True,
    )
    assert _rows(out) == _rows(ref), f"trajectories differ after a kill at step {kill_at}"
    a, b = (
        json.loads((out / "weights.json").read_text()),
        json.loads((ref / "weights.json").read_text()),
    )
    assert a["weights"] == b["weights"] and a["averaged_weights"] == b["averaged_weights"]


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "malformed",
        "format",
        "duplicate",
        "truncated",
        "config_value",
        "unknown_key",
        "prior_name",
        "non_finite",
    ],
)
def test_bad_input_gets_one_clear_error(tmp_path, sources, capsys, case):
    raw = yaml.safe_load(_config(tmp_path, sources).read_text())
    src = raw["data"]["sources"]
    expect = None
    if case == "missing":
        src[0]["path"] = str(tmp_path / "nope.jsonl")
        expect = "nope.jsonl"
    elif case == "malformed":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{not json\n')
        src[0]["path"] = str(bad)
        expect = "bad.jsonl:2"
    elif case == "format":
        src[0]["format"] = "csv-ish"
        expect = "csv-ish"
    elif case == "duplicate":
        src[1]["name"] = src[0]["name"]
        expect = src[0]["name"]
    elif case == "truncated":
        raw["data"]["max_length"] = 3  # no response token survives
        expect = "no usable example"
    elif case == "config_value":
        raw["bilevel"]["alpha"] = -1
        expect = "bilevel.alpha"
    elif case == "unknown_key":
        raw["bilevel"]["alpah"] = 1
        expect = "did you mean alpha"
    elif case == "prior_name":
        raw["bilevel"]["prior"] = {"nosuch": 1.0}
        expect = "nosuch"
    elif case == "non_finite":  # plain SGD with an absurd step: the losses overflow
        raw["bilevel"].update(optimizer="sgd", lr_u=1e30, lr_w=1e30)
        expect = "not finite"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    capsys.readouterr()
    assert reweight_main(["--config", str(cfg), "--out", str(out), "--no-progress"]) == 2
    errors = [
        ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("scalebio: error:")
    ]
    assert len(errors) == 1 and expect in errors[0], errors
    assert not (out / "weights.json").exists()
