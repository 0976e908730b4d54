"""LISA: finding decoder blocks in any HF family, the embeddings/head policy, the block draw."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import LAYERS, tiny_model
from torch import nn

from scalebio.llm.engines.lisa import (
    LisaConfig,
    active_blocks_for,
    apply_active_blocks,
    check_active,
    find_decoder_blocks,
    lisa_layout,
)

# Written out per family (the library must find these without per-family code).
EXPECTED_PATH = {
    "llama": "model.layers", "qwen2": "model.layers", "gemma2": "model.layers",
    "mistral": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
    "phi": "model.layers",
}
# Uniformity of the draw: per-block counts over many windows are Binomial(n, k/L); 5 standard
# deviations make a false alarm negligible (p < 1e-6 per block) for a fixed, derandomized run.
UNIFORM_SIGMAS = 5.0


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in LAYERS}


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_find_decoder_blocks_every_family(models, family):
    model = models[family]
    path, blocks = find_decoder_blocks(model)
    assert path == EXPECTED_PATH[family]
    assert model.get_submodule(path) is blocks
    assert len(blocks) == LAYERS[family] == model.config.num_hidden_layers


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_layout_partitions_every_parameter_once(models, family):
    model = models[family]
    paper = lisa_layout(model, LisaConfig(train_embeddings=True, train_head=True))
    ids = [id(p) for ps in paper.blocks for p in ps] + [id(p) for p in paper.persistent]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert paper.frozen == ()
    assert len(paper.persistent_names) == len(paper.persistent)
    default = lisa_layout(model, LisaConfig())  # embeddings frozen; an untied head trained
    ids = [id(p) for ps in default.blocks for p in ps]
    ids += [id(p) for p in default.persistent] + [id(p) for p in default.frozen]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = id(model.get_output_embeddings().weight)
    assert {id(p) for p in default.frozen} == embeddings | ({head} & embeddings)
    assert (head in {id(p) for p in default.persistent}) == (head not in embeddings)


def test_untied_embedding_and_head_flags(models):
    model = models["llama"]
    no_emb = lisa_layout(model, LisaConfig(train_embeddings=False))
    assert no_emb.frozen_names == ("model.embed_tokens.weight",)
    assert lisa_layout(model, LisaConfig()).frozen_names == no_emb.frozen_names  # the default
    no_head = lisa_layout(model, LisaConfig(train_embeddings=True, train_head=False))
    assert no_head.frozen_names == ("lm_head.weight",)
    neither = lisa_layout(model, LisaConfig(train_embeddings=False, train_head=False))
    assert neither.persistent_names == ("model.norm.weight",)  # the final norm always trains


def test_tied_embeddings_policy(models):
    model = models["gpt2"]
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match="train_embeddings and LisaConfig.train_head"):
        lisa_layout(model, LisaConfig(train_embeddings=False, train_head=True))
    with pytest.raises(ValueError, match="tied"):
        lisa_layout(model, LisaConfig(train_embeddings=True, train_head=False))
    off = lisa_layout(model, LisaConfig(train_embeddings=False, train_head=False))
    # token and learned position embeddings are both "embeddings"; the final norm always trains
    assert off.frozen_names == ("transformer.wte.weight", "transformer.wpe.weight")
    assert off.persistent_names == ("transformer.ln_f.weight", "transformer.ln_f.bias")
    # unset flags: the shared matrix is frozen; one set flag decides it
    assert lisa_layout(model, LisaConfig()).frozen_names == off.frozen_names
    assert lisa_layout(model, LisaConfig(train_head=False)).frozen_names == off.frozen_names
    head_on = lisa_layout(model, LisaConfig(train_head=True))
    assert head_on.frozen_names == ("transformer.wpe.weight",)  # wte trains as the head


def test_apply_active_blocks_sets_requires_grad(models):
    model = models["qwen2"]
    layout = lisa_layout(model, LisaConfig(train_embeddings=True, train_head=False))
    apply_active_blocks(layout, [1])
    for i, block in enumerate(model.model.layers):
        assert all(p.requires_grad == (i == 1) for p in block.parameters())
    assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
    apply_active_blocks(layout, None)
    assert all(p.requires_grad for p in model.model.layers.parameters())


def test_find_decoder_blocks_prefers_the_biggest_homogeneous_list():
    class Wrapper(nn.Module):  # a non-HF module: no config, decoys around the real blocks
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.ReLU()])
            self.body = nn.Module()
            self.body.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

    path, blocks = find_decoder_blocks(Wrapper())
    assert path == "body.layers" and len(blocks) == 2
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        find_decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_lisa_config_and_active_validation():
    for bad in (dict(n_active=0), dict(period=0)):
        with pytest.raises(ValueError, match="LisaConfig"):
            LisaConfig(**bad)
    with pytest.raises(TypeError, match="n_active"):
        LisaConfig(n_active=1.5)
    with pytest.raises(ValueError, match="stream"):
        active_blocks_for(0, 0, 4, LisaConfig(), "v")
    with pytest.raises(ValueError, match="step"):
        active_blocks_for(-1, 0, 4, LisaConfig(), "u")
    with pytest.raises(ValueError, match="out of range"):
        check_active([0, 4], 4)
    assert check_active([3, 1, 3], 4) == [1, 3]


@settings(derandomize=True, deadline=None, max_examples=60)
@given(step=st.integers(0, 10**6), seed=st.integers(0, 2**40), num_blocks=st.integers(1, 64),
       n_active=st.integers(1, 8), period=st.integers(1, 50))
def test_draw_is_valid_and_a_function_of_the_window(step, seed, num_blocks, n_active, period):
    cfg = LisaConfig(n_active=n_active, period=period)
    draw = active_blocks_for(step, seed, num_blocks, cfg, "u")
    assert draw == sorted(set(draw)) and len(draw) == min(n_active, num_blocks)
    assert all(0 <= i < num_blocks for i in draw)
    window_start = step - step % period  # same window -> same draw (resumable, rank-independent)
    assert active_blocks_for(window_start + period - 1, seed, num_blocks, cfg, "u") == draw
    assert active_blocks_for(window_start, seed, num_blocks, cfg, "u") == draw


def test_streams_joint_and_independent():
    joint, indep = LisaConfig(n_active=2, period=3, joint=True), LisaConfig(n_active=2, period=3)
    steps = range(0, 300, 3)
    assert all(active_blocks_for(s, 1, 8, joint, "u") == active_blocks_for(s, 1, 8, joint, "w")
               for s in steps)
    differ = sum(active_blocks_for(s, 1, 8, indep, "u") != active_blocks_for(s, 1, 8, indep, "w")
                 for s in steps)
    # independent draws of 2 of 8 coincide with probability 1/28; 100 windows: ~96 differ
    assert differ >= 80
    other_seed = sum(
        active_blocks_for(s, 1, 8, indep, "u") != active_blocks_for(s, 2, 8, indep, "u")
        for s in steps
    )
    assert other_seed >= 80


def test_draw_is_uniform_over_blocks():
    cfg, blocks, windows = LisaConfig(n_active=2, period=1), 8, 2000
    counts = torch.zeros(blocks)
    for step in range(windows):
        counts[active_blocks_for(step, 123, blocks, cfg, "w")] += 1
    p = cfg.n_active / blocks
    sigma = math.sqrt(windows * p * (1 - p))
    assert (counts - windows * p).abs().max() <= UNIFORM_SIGMAS * sigma


def test_a_disabled_config_is_no_lisa(models):
    """``enabled: false`` means what ``None`` means, for the layout and for the engine: every
    block and the embeddings/head train, whatever the other fields say."""
    from scalebio.llm.engines.engine import OptimizerSpec
    from scalebio.llm.engines.torch_engine import build_single_engine

    model = models["llama"]
    off = LisaConfig(enabled=False, n_active=1, train_embeddings=False, train_head=False)
    assert lisa_layout(model, off) == lisa_layout(model, None)
    engine = build_single_engine(tiny_model("llama"), OptimizerSpec(), off)
    assert engine.opt.active is None  # no draw needed: every block is trainable
    assert all(p.requires_grad for p in engine.module.parameters())
