"""Every shipped config parses and validates, and names its launch command in its header."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebio.llm.config import ConfigError, apply_overrides, config_from_dict, load_config

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
