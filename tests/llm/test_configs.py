"""Every shipped config parses and validates, and names its launch command in its header."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebio.llm.config import ConfigError
from scalebio.llm.config_files import apply_overrides, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "llm" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    cfg, raw = load_config(path)
    assert cfg.bilevel.steps >= 1 and len(cfg.data.source_specs()) >= 2
    assert "Launch:" in path.read_text().split("\nmodel:")[0]


def test_overrides_are_typed_and_checked():
    # "1e2" and "1e-3" are strings to YAML 1.1; numeric fields parse them as numbers
    raw = apply_overrides({}, ["--bilevel.alpha", "1e2", "--lisa.enabled", "true",
                               "--bilevel.clip", "null", "--run.seed", "3"])
    assert raw == {"bilevel": {"alpha": 100.0, "clip": None}, "lisa": {"enabled": True},
                   "run": {"seed": 3}}
    cfg = config_from_dict({"model": {"config": {"model_type": "llama"}, "tokenizer": "char"},
                            "data": {"sources": [{"name": "a", "path": "a.jsonl"}],
                                     "validation": [{"path": "v.jsonl"}]},
                            "bilevel": {"lr_u": "1e-3"}})
    assert cfg.bilevel.lr_u == 1e-3
    with pytest.raises(ConfigError, match="run.seed"):
        apply_overrides({}, ["--run.seed", "1.5"])
    with pytest.raises(ConfigError, match="did you mean alpha"):
        apply_overrides({}, ["--bilevel.alpah", "3"])
    with pytest.raises(ConfigError, match="data.sources"):
        config_from_dict({"model": {"config": {"model_type": "llama"}, "tokenizer": "char"},
                          "data": {"validation": [{"path": "v.jsonl"}]}})


PAPER_BATCH = 128  # the paper's global batch: micro-batch 1 × 16 accumulation × 8 GPUs


@pytest.mark.parametrize("path", [p for p in CONFIGS if "8gpu" in p.name], ids=lambda p: p.name)
def test_8gpu_configs_take_the_papers_batch(path):
    cfg, _ = load_config(path)
    shape = cfg.data.batch_shape()  # at the config's data.world_size
    assert cfg.data.world_size == 8 == shape.world_size
    assert shape.train_batch == shape.val_batch == PAPER_BATCH
    assert (shape.micro_batch_size, shape.accumulation) == (1, 16)
    assert shape.micro_batch_size * shape.accumulation * shape.world_size == PAPER_BATCH


def _data(**kw) -> dict:
    return {"model": {"config": {"model_type": "llama"}, "tokenizer": "char"},
            "data": {"sources": [{"name": n, "path": f"{n}.jsonl"} for n in "abc"],
                     "validation": [{"path": "v.jsonl"}], **kw}}


@pytest.mark.parametrize("kw, match", [
    (dict(per_source=8, micro_batch_size=5),
     r"data.micro_batch_size: 5 does not divide the training batch \(data.per_source 8 × 3 "
     r"sources\) of 24 sequences"),
    (dict(per_source=8, micro_batch_size=1, val_batch=16),
     r"data.val_batch: 16 is not a multiple of the step's 24 micro-batches"),
    (dict(batch_mode="uniform", global_batch=128, micro_batch_size=1, val_batch=128,
          world_size=3), r"data.world_size 3: .* 128 micro-batches .* by 3 ranks"),
    (dict(micro_batch_size=2, micro_batches=2), "data.micro_batches: the older per-rank count"),
    (dict(micro_batch_size=0), "data.micro_batch_size: need a positive integer"),
])
def test_batch_vocabulary_is_checked_when_the_config_is_read(kw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(_data(**kw))


def test_launch_world_size_must_match_the_declared_one():
    cfg = config_from_dict(_data(batch_mode="uniform", global_batch=16, val_batch=16,
                                 micro_batch_size=2, world_size=4))
    assert cfg.data.split_args(4) == {"micro_batch_size": 2}
    assert cfg.data.batch_shape(4).accumulation == 2
    with pytest.raises(ConfigError, match="laid out for 4 ranks but 2 were launched; pass "
                                          "--data.world_size 2"):
        cfg.data.split_args(2)
    free = config_from_dict(_data(per_source=4, val_batch=12, micro_batch_size=2))
    assert free.data.batch_shape(2).accumulation == 3  # 12 = 2 × 3 × 2: any world that divides
    assert free.data.batch_shape(3).accumulation == 2  # 12 = 2 × 2 × 3


def test_lisa_section_is_opt_in_and_checked():
    """A ``lisa`` section turns LISA on only with ``enabled: true``; LisaConfig's own checks
    come back as one ConfigError naming the key."""
    base = {"model": {"config": {"model_type": "llama"}, "tokenizer": "char"},
            "data": {"sources": [{"name": "a", "path": "a.jsonl"}],
                     "validation": [{"path": "v.jsonl"}]}}
    assert not config_from_dict(base).lisa.enabled
    assert not config_from_dict({**base, "lisa": {"n_active": 4}}).lisa.enabled
    on = config_from_dict({**base, "lisa": {"enabled": True, "n_active": 4}}).lisa
    assert on.enabled and on.n_active == 4 and on.period == 20
    with pytest.raises(ConfigError, match="lisa.n_active"):
        config_from_dict({**base, "lisa": {"enabled": True, "n_active": 0}})
