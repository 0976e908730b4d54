"""Sharded construction (llm/engines/materialize.py) under FSDP2: deferred models start with the
same weights as today's unsharded path and train the same; weights come from the file; the reader
refuses bad files; peak RSS on 2 ranks (subprocess). ZeRO-3: tests/llm/test_engine_zero3_load.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import lm_loss, token_batch

from scalebio.llm.config_files import config_from_dict
from scalebio.llm.engines.engine import OptimizerSpec
from scalebio.llm.engines.lisa import LisaConfig
from scalebio.llm.engines.materialize import ModelSource, deferred_model, source_of
from scalebio.llm.engines.safetensors_stream import SafetensorsFolder
from scalebio.llm.engines.torch_engine import build_fsdp2_engine
from scalebio.llm.loop.setup import load_run_model
from scalebio.llm.model import TINY_LLAMA, copy_model

ADAM = OptimizerSpec(lr=1e-2)
LISA = LisaConfig(n_active=2, period=1)
SCHEDULE = [[0, 1], [1, 2]]  # block 1 carried over the switch
MB = 2**20
# The large model of the 2-rank test: Llama, hidden 1024, 24 layers, vocab 32000 (374 M params),
# bf16 weights (748 MB of file) so that two ranks with two copies fit a small CI machine.
LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
             num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
             max_position_embeddings=256, tie_word_embeddings=False)
# Peak RSS of a rank over loading u and w ≤ its local shards of both + RSS_TENSORS full tensors
# (rank 0: the tensor read from the file and its slice being copied; rank 1: the broadcast
# buffer and its slice; one more for allocator reuse lagging behind) + RSS_SLACK (the module
# trees, DTensor/FSDP metadata, allocator granularity). Measured: +132 MB (rank 0) and +123 MB
# (rank 1) over the local shards (713 MB), largest tensor 62.5 MB.
RSS_TENSORS = 3
RSS_SLACK = 64 * MB


def _train(engine, full) -> None:
    """Two LISA steps of 2 micro-batches; ``full`` reads the whole weights."""
    for step, active in enumerate(SCHEDULE):
        engine.set_active_blocks(active)
        for micro in range(2):
            loss = lm_loss(engine.module, token_batch(10 * step + micro)) / 2
            loss.backward()
            del loss
        engine.step(1e-2, 1.0)
    return full(engine)


def _fsdp2_full(engine) -> dict:
    return {n: p.full_tensor() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("tie,bf16", [(False, False), (True, True)])
def test_fsdp2_deferred_config_model_is_todays(one_rank_group, tie, bf16):
    src = ModelSource(config=dict(TINY_LLAMA, tie_word_embeddings=tie), seed=3)
    skeleton = deferred_model(src)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for b in skeleton.buffers())  # RoPE's inv_freq computed as usual
    new = build_fsdp2_engine(copy_model(skeleton), ADAM, LISA, bf16=bf16)
    old = build_fsdp2_engine(src.load(), ADAM, LISA, bf16=bf16)
    m = new.module
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie  # tying survives meta init
    for engine in (new, old):
        assert source_of(engine.module) is None
    a, b = _fsdp2_full(new), _fsdp2_full(old)
    for name in b:  # the same initial weights, bit for bit
        assert torch.equal(a[name], b[name]) and a[name].dtype == b[name].dtype, name
    for (name, x), (_, y) in zip(m.named_buffers(), old.module.named_buffers()):
        assert torch.equal(x, y) and x.dtype == y.dtype, name
    a, b = _train(new, _fsdp2_full), _train(old, _fsdp2_full)
    for name in b:  # and the same 2-step trajectory
        assert torch.equal(a[name], b[name]), name


def _save(folder: Path, seed: int = 5, **save_kwargs) -> dict:
    model = ModelSource(config=TINY_LLAMA, seed=seed).load()
    model.save_pretrained(str(folder), **save_kwargs)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shards", [False, True], ids=["one_file", "index"])
def test_fsdp2_folder_weights_are_read_from_the_file(one_rank_group, tmp_path, monkeypatch,
                                                    shards):
    want = _save(tmp_path, **({"max_shard_size": "100KB"} if shards else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == shards
    src = ModelSource(path=str(tmp_path))

    def refuse(self):  # the weights must stream from the files, not from a full model
        raise AssertionError("the full model was built")

    monkeypatch.setattr(ModelSource, "load", refuse)
    engine = build_fsdp2_engine(deferred_model(src), ADAM, None)
    for name, p in engine.module.named_parameters():
        assert torch.equal(p.full_tensor(), want[name]), name


def test_fsdp2_folder_without_safetensors_loads_on_rank0(one_rank_group, tmp_path):
    want = _save(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")  # an old-format checkpoint
    engine = build_fsdp2_engine(deferred_model(ModelSource(path=str(tmp_path))), ADAM, None)
    for name, p in engine.module.named_parameters():
        assert torch.equal(p.full_tensor(), want[name]), name


def test_misshaped_or_damaged_files_are_named(one_rank_group, tmp_path):
    _save(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"model\.safetensors.*'model\.norm\.weight' has shape"):
        build_fsdp2_engine(deferred_model(ModelSource(path=str(tmp_path))), ADAM, None)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="model.safetensors"):
        SafetensorsFolder(tmp_path)


def test_single_engine_refuses_a_deferred_model():
    from scalebio.llm.engines.torch_engine import build_single_engine

    with pytest.raises(ValueError, match="deferred"):
        build_single_engine(deferred_model(ModelSource(config=TINY_LLAMA)), ADAM, None)


def test_reader_matches_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).bfloat16(),
               "c": torch.arange(4), "d": torch.zeros(0, 2), "e": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = SafetensorsFolder(tmp_path)
    assert files.keys() == set(tensors)
    for key, value in load_file(str(tmp_path / "model.safetensors")).items():
        got = files.get(key)
        assert got.dtype == value.dtype and torch.equal(got, value), key
    files.close()


@pytest.mark.parametrize("kind,stage,deferred", [("fsdp2", 2, True), ("deepspeed", 3, True),
                                                 ("deepspeed", 2, False), ("ddp", 2, False)])
def test_load_run_model_defers_under_sharding_engines(kind, stage, deferred):
    raw = {"model": {"config": TINY_LLAMA, "tokenizer": "char"},
           "data": {"sources": [{"name": "a", "path": "a.jsonl"}],
                    "validation": [{"path": "v.jsonl"}]},
           "engine": {"kind": kind, "zero_stage": stage}}
    model = load_run_model(config_from_dict(raw), torch.device("cpu"))
    assert (source_of(model) is not None) == deferred
    assert all(p.is_meta for p in model.parameters()) == deferred


def _torchrun(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    script = Path(__file__).parent / "dist_scripts" / "sharded_load.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), str(out), *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and len(result["ranks"]) == 2
    return result


def test_two_ranks_fsdp2_deferred_is_todays(tmp_path):
    for rank in _torchrun(tmp_path)["ranks"]:  # every local shard, at the start and 2 steps on
        assert rank["tiny"] == {"fp32": [True] * 3, "bf16": [True] * 3}, rank


def _write_large(folder: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(**LARGE).save_pretrained(str(folder))
    skeleton = deferred_model(ModelSource(path=str(folder), dtype="bfloat16"))
    gen = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(p.shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)
               for n, p in skeleton.named_parameters()}, str(folder / "model.safetensors"))


# 14 s on 2 idle cores, ~50 s on loaded ones (a 748 MB file, then 2 ranks load it twice): under
# the 60 s at which a test goes to the slow set. Memory: ~1.3 GB per rank, 0.8 GB in this process.
def test_two_ranks_large_model_peak_rss(tmp_path):
    _write_large(tmp_path / "large")
    result = _torchrun(tmp_path, str(tmp_path / "large"))
    for i, rank in enumerate(result["ranks"]):
        large = rank["large"]
        assert large["shards_equal_file"], i
        grew = large["peak"] - large["baseline"]
        bound = large["local_bytes"] + RSS_TENSORS * large["largest_tensor"] + RSS_SLACK
        print(f"rank {i}: peak RSS +{grew / MB:.0f} MB (bound {bound / MB:.0f} MB; local shards "
              f"{large['local_bytes'] / MB:.0f} MB; both full copies {large['full_bytes'] / MB:.0f}"
              " MB)")
        assert grew <= bound, (i, grew / MB, bound / MB)
        assert grew < 0.7 * large["full_bytes"], i  # today every rank held both full copies
