"""llm/data/batching.py: pure in (seed, step), rank split, global counts, padding, sampling laws."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_data import alpaca_records, make_char_tokenizer, write_jsonl

from scalebio.llm.data.batching import StepSampler, batch_shape
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
    (dict(micro_batches=5, world_size=2, rank=1),
     "cannot fill micro_batches × world_size = 5 × 2 = 10"),
    (dict(micro_batch_size=5, micro_batches=None), "micro_batch_size: 5 does not divide"),
    (dict(micro_batch_size=2, micro_batches=None, world_size=4, rank=1),
     "world_size 4: .* 6 micro-batches .* cannot be shared evenly by 4 ranks"),
    (dict(micro_batch_size=4, micro_batches=None, val_batch=4),
     "val_batch: 4 is not a multiple of the step's 3 micro-batches"),
    (dict(micro_batch_size=2, micro_batches=2), "micro_batch_size and micro_batches: give one"),
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


@pytest.mark.parametrize("mode", ["stratified", "uniform"])
@pytest.mark.parametrize("world, mbs", [(1, 3), (2, 3), (3, 2), (2, 6)])
def test_micro_batch_size_gives_equal_micro_batches_and_keeps_the_global_draw(setup, mode, world,
                                                                            mbs):
    # B = micro_batch_size × accumulation × world: per_source 4 × 3 sources = 12 (uniform: 12)
    kw = dict(per_source=4) if mode == "stratified" else dict(per_source=None, global_batch=12)
    accumulation = 12 // (mbs * world)
    single = _sampler(setup, mode, micro_batches=None, micro_batch_size=mbs, val_batch=24,
                      **kw).batch(9)
    for rank in range(world):
        mine = _sampler(setup, mode, micro_batches=None, micro_batch_size=mbs, val_batch=24,
                        rank=rank, world_size=world, **kw).batch(9)
        assert len(mine.train) == len(mine.val) == accumulation
        assert {m["input_ids"].shape[0] for m in mine.train} == {mbs}
        assert {m["input_ids"].shape[0] for m in mine.val} == {24 // (12 // mbs)}
        _same(mine.train, single.train[rank::world])  # the same global chunks, dealt round-robin
        _same(mine.val, single.val[rank::world])
        assert torch.equal(mine.counts, single.counts)


def test_older_per_rank_micro_batches_split_like_the_equivalent_micro_batch_size(setup):
    # micro_batches=M per rank on W ranks is C = M·W chunks: the same as micro_batch_size = B / C
    old = _sampler(setup, micro_batches=2, world_size=2, rank=1, val_batch=8).batch(3)
    new = _sampler(setup, micro_batches=None, micro_batch_size=3, world_size=2, rank=1,
                   val_batch=8).batch(3)
    _same(old.train, new.train)
    _same(old.val, new.val)


@pytest.mark.parametrize("args, shape", [
    # (train, val, world, micro_batch_size, micro_batches) -> (accumulation, mbs, val mbs, exact)
    ((128, 128, 8, 1, None), (16, 1, 1, True)),  # the paper: 1 × 16 × 8
    ((24, 48, 2, 4, None), (3, 4, 8, True)),
    ((24, 16, 2, None, None), (1, 12, 8, True)),  # no accumulation
    ((10, 8, 2, None, 2), (2, 3, 2, False)),  # older per-rank count: near-equal chunks
])
def test_batch_shape_arithmetic(args, shape):
    got = batch_shape(*args)
    assert (got.accumulation, got.micro_batch_size, got.val_micro_batch_size, got.exact) == shape
    if got.exact:  # the vocabulary's identity, and the validation split over the same chunks
        assert got.train_batch == got.micro_batch_size * got.accumulation * got.world_size
        assert got.val_batch == got.val_micro_batch_size * got.chunks


def test_batch_shape_messages_name_the_fields_and_the_arithmetic():
    labels = {"train": "training batch (data.global_batch)", "mbs": "data.micro_batch_size",
              "val": "data.val_batch", "world": "data.world_size"}
    with pytest.raises(ValueError, match=r"data.world_size 5: the training batch "
                       r"\(data.global_batch\) of 24 = 24 micro-batches of "
                       r"data.micro_batch_size 1 cannot be shared evenly by 5 ranks"):
        batch_shape(24, 24, 5, 1, labels=labels)
    with pytest.raises(ValueError, match=r"data.val_batch: 16 is not a multiple of the step's 24 "
                       r"micro-batches .* \(e.g. data.val_batch 24\)"):
        batch_shape(24, 16, 1, 1, labels=labels)
