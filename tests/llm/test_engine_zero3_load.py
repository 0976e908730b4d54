"""Sharded construction under DeepSpeed ZeRO-3 (llm/engines/materialize.py): a deferred model
is built partitioned and starts with the same weights as today's path (a config model) or the
file's (a folder), and trains the same. The FSDP2 side: tests/llm/test_sharded_load.py."""

from __future__ import annotations

import pytest
import torch
from test_sharded_load import ADAM, LISA, _save, _train

from scalebio.llm.engines.materialize import ModelSource, deferred_model
from scalebio.llm.model import TINY_LLAMA, copy_model

pytestmark = pytest.mark.deepspeed
# ZeRO-3 keeps params under this many elements whole on every rank: 100 partitions every
# matrix of the tiny model (and keeps its norms whole), so the load really goes by partitions.
ZERO = {"stage3_param_persistence_threshold": 100}


def _zero3_full(engine) -> dict:
    return engine.full_model_state_dict()


@pytest.mark.parametrize("bf16", [False, True])
def test_zero3_deferred_config_model_is_todays(deepspeed_dist, bf16):
    from scalebio.llm.engines.deepspeed_zero import build_deepspeed_engine

    src = ModelSource(config=dict(TINY_LLAMA, tie_word_embeddings=bf16), seed=3)
    new, old = (build_deepspeed_engine(m, ADAM, LISA, 3, bf16=bf16, zero_config=ZERO)
                for m in (copy_model(deferred_model(src)), src.load()))
    # partitioned when built (the engine itself is built lazily): no full matrix on any rank
    assert all(hasattr(p, "ds_id") for p in new.model.parameters())
    assert not any(hasattr(p, "ds_id") for p in old.model.parameters())
    assert max(p.data.numel() for p in new.model.parameters() if p.ds_numel > 100) == 0
    for a, b in ((_zero3_full(new), _zero3_full(old)), (_train(new, _zero3_full),
                                                        _train(old, _zero3_full))):
        for name in b:  # the same start and 2-step trajectory (a carried block included)
            assert torch.equal(a[name], b[name]) and a[name].dtype == b[name].dtype, name
    for (name, x), (_, y) in zip(new.model.named_buffers(), old.model.named_buffers()):
        assert torch.equal(x, y) and x.dtype == y.dtype, name


def test_zero3_deferred_folder_model_is_the_file(deepspeed_dist, tmp_path):
    from scalebio.llm.engines.deepspeed_zero import build_deepspeed_engine

    want = _save(tmp_path)
    engine = build_deepspeed_engine(deferred_model(ModelSource(path=str(tmp_path))), ADAM, None,
                                    3, zero_config=ZERO)
    full = engine.full_model_state_dict()
    for name, value in want.items():
        assert torch.equal(full[name], value), name
