"""Tests of model loading/building (seeded, offline) and of the second ScaleBiO copy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scalebio.llm.data.tokenizer import char_tokenizer
from scalebio.llm.model import TINY_LLAMA, copy_model, load_model, resolve_dtype

SMALL_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 107,
    "max_position_embeddings": 64,
}
SMALL_GPT2 = {
    "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 50,
    "n_positions": 32, "bos_token_id": 0, "eos_token_id": 1,
    "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
}
# Relative error allowed on the std of the HF normal init: the sample std of n = 107*64 = 6848
# draws has relative standard error 1/sqrt(2n) ~ 0.85%, so 5% is ~6 standard errors.
INIT_STD_RTOL = 0.05
# At init the logits have std ~ initializer_range * sqrt(hidden) ~ 0.2: the mean CE over ~20-30
# tokens sits within a few times 0.2/sqrt(25) = 0.04 of ln V (measured: -0.08, +0.006, +0.04).
INIT_LOSS_ATOL = 0.15


def _params(model):
    return dict(model.named_parameters())


def _assert_same_weights(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=0, msg=name)


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = load_model(config=SMALL_LLAMA, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    second = load_model(config=SMALL_LLAMA, seed=7)
    _assert_same_weights(first, second)
    other = load_model(config=SMALL_LLAMA, seed=8)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(_params(first)[emb], _params(other)[emb])
    assert first.training


def test_config_dict_is_not_modified_and_hf_init_is_used():
    config = dict(SMALL_LLAMA)
    model = load_model(config=config, seed=0)
    assert config == SMALL_LLAMA
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    expected_std = model.config.initializer_range
    emb_std = model.model.embed_tokens.weight.std().item()
    assert emb_std == pytest.approx(expected_std, rel=INIT_STD_RTOL)


def test_dtype_and_bad_dtype():
    model = load_model(config=SMALL_LLAMA, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype"):
        load_model(config=SMALL_LLAMA, dtype="float64")


def test_save_and_reload_from_folder(tmp_path):
    model = load_model(config=SMALL_LLAMA, seed=3)
    model.save_pretrained(tmp_path)
    reloaded = load_model(path=str(tmp_path), seed=99)  # the seed must not matter here
    _assert_same_weights(model, reloaded)
    half = load_model(path=str(tmp_path), dtype="bfloat16")
    torch.testing.assert_close(
        half.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16(), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one"),
        ({"path": "x", "config": SMALL_LLAMA}, ValueError, "exactly one"),
        ({"config": {"hidden_size": 8}}, ValueError, "no 'model_type'"),
        ({"config": {"model_type": "no_such_family"}}, ValueError, "no_such_family"),
        ({"config": {"model_type": "vit"}}, ValueError, "no causal-LM"),
        ({"config": [("model_type", "llama")]}, ValueError, "must be a dict"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_model(**kwargs)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_model(path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(path=str(tmp_path))


def test_initial_loss_is_near_uniform():
    # A second decoder family (GPT-2) builds through the same route; both start near ln V.
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    for config in (SMALL_LLAMA, SMALL_GPT2):
        model = load_model(config=config, seed=0).eval()
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert loss == pytest.approx(math.log(config["vocab_size"]), abs=INIT_LOSS_ATOL)


def test_copy_is_identical_and_independent():
    model = load_model(config=SMALL_GPT2, seed=5)
    twin = copy_model(model)
    _assert_same_weights(model, twin)
    assert twin.config.to_dict() == model.config.to_dict()
    assert twin.training == model.training
    drop = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drop and drop == [m.p for m in twin.modules() if isinstance(m, nn.Dropout)]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.data_ptr() != q.data_ptr()
    # Same dropout masks under the same seed: the two copies compute the same function.
    ids = torch.arange(12).reshape(2, 6)
    outputs = []
    for m in (model, twin):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outputs.append(m(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    # Training one copy leaves the other alone.
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(twin.parameters()))


def test_copy_refuses_zero3_partitioned_models():
    model = load_model(config=SMALL_LLAMA)
    next(model.parameters()).ds_id = 0  # the marker DeepSpeed ZeRO-3 puts on partitioned params
    with pytest.raises(ValueError, match="ZeRO-3"):
        copy_model(model)


def test_tiny_llama_matches_char_tokenizer():
    tokenizer = char_tokenizer()
    assert TINY_LLAMA["vocab_size"] == len(tokenizer)
    assert TINY_LLAMA["pad_token_id"] == tokenizer.pad_token_id
    assert TINY_LLAMA["bos_token_id"] == tokenizer.bos_token_id
    assert TINY_LLAMA["eos_token_id"] == tokenizer.eos_token_id
    model = load_model(config=TINY_LLAMA, seed=0).eval()
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128
    messages = [{"role": "user", "content": "What is 37 + 58?"},
                {"role": "assistant", "content": "95"}]
    ids = torch.tensor([tokenizer.apply_chat_template(messages)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss == pytest.approx(math.log(len(tokenizer)), abs=INIT_LOSS_ATOL)


# Checkpointed and plain backward run the same float64 kernels on the same inputs (the recompute
# repeats the forward exactly, dropout included), so they agree to round-off: measured 0 (bitwise);
# 1e-13 allows a reordered reduction in some kernel without hiding a missing or doubled term.
CKPT_TOL = 1e-13


@pytest.mark.parametrize("train_embeddings", [True, False])
def test_gradient_checkpointing_gives_the_same_grads_under_lisa(train_embeddings, monkeypatch):
    from scalebio.llm.engines.engine import OptimizerSpec
    from scalebio.llm.engines.lisa import LisaConfig
    from scalebio.llm.engines.torch_engine import build_single_engine

    ids = torch.randint(0, 107, (2, 12), generator=torch.Generator().manual_seed(4))
    lisa = LisaConfig(n_active=1, train_embeddings=train_embeddings, train_head=True)
    grads, calls = [], []  # calls: MLP forwards of blocks 0 and 1 per run (inside the checkpoint)
    for checkpointing in (False, True):
        model = load_model(config=SMALL_LLAMA, seed=3, gradient_checkpointing=checkpointing)
        model = model.double()
        engine = build_single_engine(model, OptimizerSpec("sgd"), lisa)
        engine.set_active_blocks([1])  # block 0 frozen
        # count MLP forwards by patching the class: HF's recompute does not run module hooks
        mlps = [model.model.layers[i].mlp for i in (0, 1)]
        count = {id(m): 0 for m in mlps}
        forward = type(mlps[0]).forward

        def counting(self, *args, _forward=forward, _count=count, **kwargs):
            _count[id(self)] = _count.get(id(self), 0) + 1
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(type(mlps[0]), "forward", counting)
        model(input_ids=ids, labels=ids).loss.backward()
        monkeypatch.undo()
        calls.append([count[id(m)] for m in mlps])
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    # Checkpointing recomputes the active block in backward, even when nothing below it needs a
    # grad (the case a reentrant checkpoint gets wrong); block 0 is recomputed only when the
    # backward must pass through it to reach trainable embeddings.
    assert calls == [[1, 1], [2 if train_embeddings else 1, 2]]
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys()
    assert any(k.startswith("model.layers.1.") for k in plain)
    assert not any(k.startswith("model.layers.0.") for k in plain)
    assert ("model.embed_tokens.weight" in plain) == train_embeddings
    for k in plain:
        assert float(plain[k].abs().max()) > 0, k
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=CKPT_TOL, msg=k)


def test_attention_implementation_is_applied(monkeypatch):
    model = load_model(config=SMALL_LLAMA, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert load_model(config=SMALL_LLAMA).is_gradient_checkpointing is False
    monkeypatch.setattr("scalebio.llm.model._flash_attn_installed", lambda: False)
    with pytest.raises(ValueError, match="attn_implementation: flash_attention_2 needs"):
        load_model(config=SMALL_LLAMA, attn_implementation="flash_attention_2")


def test_model_args_memory_options(monkeypatch):
    import importlib.util

    from scalebio.llm.config import ConfigError, ModelArgs

    base = {"config": SMALL_LLAMA, "tokenizer": "char"}
    args = ModelArgs(**base)
    assert args.gradient_checkpointing is False and args.attn_implementation == "sdpa"
    assert ModelArgs(**base, attn_implementation="eager").attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation: expected sdpa"):
        ModelArgs(**base, attn_implementation="flash")
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        ModelArgs(**base, gradient_checkpointing="yes")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 needs"):
        ModelArgs(**base, attn_implementation="flash_attention_2")


def test_zero3_refuses_gradient_checkpointing_and_other_engines_accept_it():
    """Measured: ZeRO-3 + non-reentrant recomputation fails in the first backward
    (CheckpointError, parameters of shape [0]); the config says so before anything is loaded."""
    from scalebio.llm.config import ConfigError
    from scalebio.llm.config_files import config_from_dict

    raw = {"model": {"config": SMALL_LLAMA, "tokenizer": "char", "gradient_checkpointing": True},
           "data": {"sources": [{"name": "a", "path": "a.jsonl"}],
                    "validation": [{"path": "v.jsonl"}]}}
    with pytest.raises(ConfigError, match="model.gradient_checkpointing: not supported with "
                                          "engine.kind: deepspeed and zero_stage: 3"):
        config_from_dict({**raw, "engine": {"kind": "deepspeed", "zero_stage": 3}})
    for engine in ({"kind": "deepspeed", "zero_stage": 2}, {"kind": "fsdp2"}, {"kind": "single"}):
        assert config_from_dict({**raw, "engine": engine}).model.gradient_checkpointing
