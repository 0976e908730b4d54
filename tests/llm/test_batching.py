"""llm/data/batching.py: pure in (seed, step), rank split, global counts, padding, sampling laws."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_data import alpaca_records, make_char_tokenizer, write_jsonl

from scalebio.llm.data.batching import StepSampler
from scalebio.llm.data.sources import SourceSpec, load_sources
from scalebio.llm.loop.losses import count_targets

SIZES = {"a": 5, "b": 12, "c": 3}
# Frequencies over many i.i.d. draws: a deterministic seed, checked against the binomial law with a
# 5-sigma band (a correct sampler fails this with probability < 1e-6 per comparison).
SIGMAS = 5.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("batching")
    tok = make_char_tokenizer()
    train = [SourceSpec(n, str(write_jsonl(d / f"{n}.jsonl", alpaca_records(m, seed=i))), "alpaca")
             for i, (n, m) in enumerate(SIZES.items())]
    val = [SourceSpec(n, str(write_jsonl(d / f"{n}.jsonl", alpaca_records(m, seed=10 + m))),
                      "alpaca") for n, m in (("v1", 4), ("v2", 6))]
    return load_sources(train, val, tok, 64, d / "cache"), tok.pad_token_id


def _sampler(setup, mode="stratified", **kw):
    data, pad = setup
    args = dict(val_batch=8, micro_batches=2, seed=3, pad_token_id=pad)
    args.update(dict(per_source=4) if mode == "stratified" else dict(global_batch=10))
    args.update(kw)
    return StepSampler(data, mode, **args)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("mode", ["stratified", "uniform"])
def test_batches_are_a_pure_function_of_seed_and_step(setup, mode):
    s1, s2 = _sampler(setup, mode), _sampler(setup, mode)
    later = s1.batch(7)
    s1.batch(2)
    again = s1.batch(7)
    for b in (again, s2.batch(7)):
        _same(b.train, later.train)
        _same(b.val, later.val)
        assert torch.equal(b.counts, later.counts) and b.val_tokens == later.val_tokens
    draws = [torch.cat(_sampler(setup, mode, seed=sd).draw(st)[1:]) for sd, st in
             ((3, 7), (3, 8), (4, 7))]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("mode", ["stratified", "uniform"])
def test_rank_r_gets_global_micro_batches_r_plus_jW(setup, mode):
    world, micro = 2, 3
    single = _sampler(setup, mode, micro_batches=world * micro).batch(5)
    for rank in range(world):
        mine = _sampler(setup, mode, micro_batches=micro, rank=rank, world_size=world).batch(5)
        _same(mine.train, single.train[rank::world])
        _same(mine.val, single.val[rank::world])
        assert torch.equal(mine.counts, single.counts) and mine.val_tokens == single.val_tokens


@pytest.mark.parametrize("mode", ["stratified", "uniform"])
def test_counts_and_val_tokens_are_global(setup, mode):
    ranks = [_sampler(setup, mode, rank=r, world_size=2).batch(11) for r in range(2)]
    ids = torch.cat([m["source_ids"] for b in ranks for m in b.train])
    assert ranks[0].counts.tolist() == torch.bincount(ids, minlength=3).tolist()
    assert ranks[0].counts.sum() == (12 if mode == "stratified" else 10)
    if mode == "stratified":
        assert ranks[0].counts.tolist() == [4, 4, 4]
    tokens = sum(int(count_targets(m["labels"]).sum()) for b in ranks for m in b.val)
    assert ranks[0].val_tokens == tokens == ranks[1].val_tokens
    assert sum(m["input_ids"].shape[0] for b in ranks for m in b.val) == 8


def test_micro_batches_hold_the_drawn_rows_right_padded(setup):
    data, pad = setup
    sampler = _sampler(setup, "uniform", micro_batches=1)
    sources, local, val = sampler.draw(4)
    (tr,), (va,) = sampler.batch(4).train, sampler.batch(4).val
    assert tr["source_ids"].tolist() == sources.tolist()
    rows_train = [data.train[s][i] for s, i in zip(sources.tolist(), local.tolist())]
    rows_val = [data.val[i] for i in val.tolist()]
    for mb, rows in ((tr, rows_train), (va, rows_val)):
        assert mb["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            assert mb["input_ids"][i, :n].tolist() == r["input_ids"]
            assert mb["labels"][i, :n].tolist() == r["labels"]
            pads = mb["input_ids"].shape[1] - n
            assert mb["attention_mask"][i].tolist() == [1] * n + [0] * pads
            assert (mb["input_ids"][i, n:] == pad).all() and (mb["labels"][i, n:] == -100).all()
    assert va["source_ids"].tolist() == [data.val["source"][i] for i in val.tolist()]


def _within_band(count, n, p):
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


def test_uniform_draws_sources_in_proportion_to_size(setup):
    sampler = _sampler(setup, "uniform")
    sources = torch.cat([sampler.draw(step)[0] for step in range(400)])
    total = sum(SIZES.values())
    for k, size in enumerate(SIZES.values()):
        assert _within_band(int((sources == k).sum()), len(sources), size / total)
    absent = [step for step in range(400) if 0 in sampler.draw(step)[0].bincount(minlength=3)]
    assert absent  # uniform batches do leave sources out; their c_k = 0 (documented)


def test_stratified_draws_uniformly_within_each_source(setup):
    sampler = _sampler(setup, "stratified")
    draws = [sampler.draw(step) for step in range(300)]
    sources = torch.cat([d[0] for d in draws])
    local = torch.cat([d[1] for d in draws])
    for k, size in enumerate(SIZES.values()):
        picked = local[sources == k]
        assert len(picked) == 4 * 300
        for j in range(size):
            assert _within_band(int((picked == j).sum()), len(picked), 1 / size)
    val = torch.cat([d[2] for d in draws])
    for j in range(10):
        assert _within_band(int((val == j).sum()), len(val), 1 / 10)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="both"), "mode: expected one of"),
    (dict(per_source=0), "per_source: a positive integer"),
    (dict(global_batch=8), "global_batch: only for mode='uniform'"),
    (dict(mode="uniform", per_source=2, global_batch=None), "per_source: only for"),
    (dict(rank=2, world_size=2), r"rank: must lie in \[0, 2\)"),
    (dict(micro_batches=5, world_size=2, rank=1), "cannot fill micro_batches × world_size = 10"),
    (dict(val_batch=1), "val_batch: 1 examples cannot fill"),
    (dict(pad_token_id=None), "pad_token_id"),
])
def test_bad_arguments_raise(setup, kw, match):
    data, pad = setup
    args = dict(mode="stratified", per_source=4, val_batch=8, micro_batches=2, seed=0,
                pad_token_id=pad)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        StepSampler(data, args.pop("mode"), **args)
    with pytest.raises(ValueError, match="step: a non-negative integer"):
        _sampler(setup).batch(-1)
