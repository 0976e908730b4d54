"""`scalebio sft`: the loss falls on an easy task, a stopped run resumes to the same trajectory and
weights bit for bit, outputs follow the contract, bad inputs fail with a clear error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalebio.llm.cli import sft_main
from scalebio.llm.config_files import config_from_dict
from scalebio.llm.data.sources import DataError
from scalebio.llm.data.tokenizer import char_vocab
from scalebio.llm.outputs import OutputError
from scalebio.llm.pipeline.sft import TRAJECTORY_FIELDS, sft
from scalebio.llm.tasks.demo_data import write_demo_sources

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "vocab_size": len(char_vocab()), "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2}
# The loss of the last steps must be below this fraction of the first steps' loss: a random char
# model starts near ln(107) ≈ 4.7 nats and learns the template/digit distribution within 30 steps.
DECREASE_FRACTION = 0.8


def write_mixture(path: Path, alpaca_file: str, source: str = "clean") -> Path:
    """The alpaca records of ``alpaca_file`` as a `scalebio mix`-style messages mixture."""
    rows = []
    for line in Path(alpaca_file).read_text().splitlines():
        r = json.loads(line)
        rows.append({"messages": [{"role": "user", "content": r["instruction"]},
                                  {"role": "assistant", "content": r["output"]}],
                     "source": source})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def demo_files(folder: Path) -> dict:
    """Clean two-digit additions: 40 training records, 8 validation records."""
    return write_demo_sources(folder, seed=5, n_train_per_source=40, n_val=8,
                              corruption_rates=(0.5,), off_target=())


def sft_config(files: dict, cache: Path, steps: int = 30, checkpoint_every: int = 0, **bilevel):
    raw = {
        "model": {"config": TINY, "tokenizer": "char"},
        "data": {"sources": files["sources"], "validation": [files["val"]], "max_length": 48,
                 "global_batch": 8, "val_batch": 2, "micro_batches": 2,
                 "cache_dir": str(cache)},
        "bilevel": {"steps": steps, "lr_w": 3e-3, "schedule": "cosine", "warmup_ratio": 0.1,
                    **bilevel},
        "run": {"seed": 0, "checkpoint_every": checkpoint_every, "tracker": "none", "threads": 1},
    }
    return config_from_dict(raw), raw


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    files = demo_files(d / "data")
    mixture = write_mixture(d / "mixture.jsonl", files["sources"][0]["path"])
    return d, files, mixture


def test_loss_decreases_and_outputs(setup, tmp_path):
    d, files, mixture = setup
    cfg, _ = sft_config(files, d / "cache", steps=30)
    rows = sft(cfg, mixture, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in rows]
    assert len(rows) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < DECREASE_FRACTION * first, (first, last)
    with open(tmp_path / "run" / "trajectory.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == TRAJECTORY_FIELDS
    assert [int(r["step"]) for r in table] == list(range(30))
    assert float(table[-1]["lr"]) < float(table[5]["lr"])  # the cosine decays
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "config.json").is_file()
    assert any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    assert not (tmp_path / "run" / "model.tmp").exists()


def test_resume_is_bitwise(setup, tmp_path):
    d, files, mixture = setup
    cfg, _ = sft_config(files, d / "cache", steps=8, checkpoint_every=3)
    full = sft(cfg, mixture, tmp_path / "full", progress=False)
    part = sft(cfg, mixture, tmp_path / "part", progress=False, stop_after=5)  # checkpoint at 3
    assert len(part) == 5 and not (tmp_path / "part" / "model").exists()
    resumed = sft(cfg, mixture, tmp_path / "part", resume=True, progress=False)
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_folder_input_and_lisa(setup, tmp_path):
    """A `scalebio mix` output folder is accepted (its mixture.jsonl), and LISA trains."""
    d, files, mixture = setup
    folder = tmp_path / "mixout"
    folder.mkdir()
    write_mixture(folder / "mixture.jsonl", files["sources"][0]["path"])
    raw = sft_config(files, d / "cache", steps=4)[1]
    raw["lisa"] = {"enabled": True, "n_active": 1, "period": 2}
    rows = sft(config_from_dict(raw), folder, tmp_path / "run", progress=False)
    assert len(rows) == 4 and all(r["grad_norm"] > 0 for r in rows)


def test_errors(setup, tmp_path):
    d, files, mixture = setup
    cfg, _ = sft_config(files, d / "cache", steps=2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        sft(cfg, empty, tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="no such file"):
        sft(cfg, tmp_path / "missing.jsonl", tmp_path / "b", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        sft(cfg, mixture, tmp_path / "busy", progress=False)
    inside = write_mixture(tmp_path / "busy" / "m.jsonl", files["sources"][0]["path"])
    with pytest.raises(OutputError, match="would delete inputs"):
        sft(cfg, inside, tmp_path / "busy", overwrite=True, progress=False)
    with pytest.raises(OutputError, match="no checkpoints"):
        sft(cfg, mixture, tmp_path / "busy", resume=True, progress=False)


def test_cli(setup, tmp_path, capsys):
    d, files, mixture = setup
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(sft_config(files, d / "cache", steps=2)[1]))
    out = tmp_path / "run"
    assert sft_main(["--config", str(cfg_file), "--data", str(mixture), "--out", str(out),
                     "--no-progress"]) == 0
    assert (out / "model" / "config.json").is_file()
    assert sft_main(["--config", str(cfg_file), "--data", str(mixture), "--out", str(out),
                     "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
