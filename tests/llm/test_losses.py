"""llm/loop/losses.py against hand-written float64 references, and gradient accumulation
exactness."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_data import alpaca_records, make_char_tokenizer, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import scalebio as sb
from scalebio.llm.data.batching import StepSampler
from scalebio.llm.data.sources import SourceSpec, load_sources
from scalebio.llm.loop.losses import (
    count_targets,
    per_example_loss,
    source_partial_sums,
    val_partial_sum,
)

# bf16 logits are upcast to float32 before CE: float32 round-off on O(1) losses over V=11 classes.
FLOAT32_LOSS_TOL = 1e-5


def _ce_ref(row_logits, target):
    """-log softmax(row_logits)[target], written out: log Σ_j exp(z_j) − z_target."""
    return math.log(sum(math.exp(z) for z in row_logits.tolist())) - row_logits[target].item()


def _per_example_ref(logits, labels):
    out = []
    for b in range(labels.shape[0]):
        ces = [_ce_ref(logits[b, t], int(labels[b, t + 1])) for t in range(labels.shape[1] - 1)
               if labels[b, t + 1] != -100]
        out.append(sum(ces) / len(ces) if ces else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def _random_case(seed, b=4, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.4] = -100
    labels[0, :] = -100  # an example with no supervised target
    labels[1, 1:] = -100  # only position 0 supervised: nothing left after the shift
    labels[2, :3] = -100
    labels[2, 3:] = torch.arange(3, t)  # fully supervised response
    return logits, labels


def test_per_example_loss_matches_reference():
    logits, labels = _random_case(0)
    got = per_example_loss(logits, labels)
    assert_close(got, _per_example_ref(logits, labels))
    assert got[0] == 0 and got[1] == 0
    assert count_targets(labels).tolist() == [int((labels[b, 1:] != -100).sum()) for b in range(4)]


def test_per_example_loss_upcasts_bf16():
    logits, labels = _random_case(1)
    got = per_example_loss(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert_close(got.double(), _per_example_ref(logits.bfloat16().double(), labels),
                 rtol=FLOAT32_LOSS_TOL, atol=FLOAT32_LOSS_TOL)


def test_val_partial_sum_matches_reference():
    logits, labels = _random_case(2)
    ces = [_ce_ref(logits[b, t], int(labels[b, t + 1])) for b in range(4) for t in range(6)
           if labels[b, t + 1] != -100]
    assert_close(val_partial_sum(logits, labels, 40), torch.tensor(sum(ces) / 40,
                                                                   dtype=torch.float64))
    with pytest.raises(ValueError, match="total_tokens"):
        val_partial_sum(logits, labels, 0)


@settings(derandomize=True, deadline=None, max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(-5, 5)), min_size=1, max_size=12),
       st.lists(st.integers(0, 3), min_size=5, max_size=5))
def test_source_partial_sums_match_reference(pairs, extra):
    ids = torch.tensor([s for s, _ in pairs])
    losses = torch.tensor([x for _, x in pairs], dtype=torch.float64)
    # global counts: this micro-batch's counts plus examples of other micro-batches
    counts = torch.bincount(ids, minlength=5) + torch.tensor(extra)
    want = [sum(x for s, x in pairs if s == k) / int(counts[k]) if counts[k] else 0.0
            for k in range(5)]
    assert_close(source_partial_sums(losses, ids, counts), torch.tensor(want, dtype=torch.float64))


def test_source_partial_sums_reject_inconsistent_counts():
    with pytest.raises(ValueError, match="global count 0"):
        source_partial_sums(torch.ones(2), torch.tensor([0, 1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="source_ids: values must lie in"):
        source_partial_sums(torch.ones(2), torch.tensor([0, 3]), torch.tensor([1, 1]))


# ---------------------------------------------------------------- accumulation is exact


def _tiny_llama(vocab_size):
    torch.manual_seed(0)  # HF init draws from the global RNG; seeded for determinism
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double()


def _combine(theta, h):
    return sb.weighted_sum(torch.softmax(theta, 0), h)


def _grads(models, theta):
    return [p.grad.clone() for m in models for p in m.parameters()] + [theta.grad.clone()]


@pytest.mark.parametrize("mode", ["stratified", "uniform"])
def test_accumulated_micro_batches_give_the_big_batch_gradient(tmp_path, mode):
    tok = make_char_tokenizer()
    specs = [SourceSpec(n, str(write_jsonl(tmp_path / f"{n}.jsonl", alpaca_records(m, seed=i))),
                        "alpaca") for i, (n, m) in enumerate([("a", 6), ("b", 9), ("c", 4)])]
    val = [SourceSpec("v", str(write_jsonl(tmp_path / "v.jsonl", alpaca_records(5, 9))), "alpaca")]
    data = load_sources(specs, val, tok, 48, tmp_path / "cache")
    kw = dict(per_source=3) if mode == "stratified" else dict(global_batch=12)
    z = _tiny_llama(len(tok))
    y = copy.deepcopy(z)
    with torch.no_grad():  # w ≠ u so that Δ_k ≠ 0 and θ's gradient is not trivially 0
        for p in y.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1),
                                      dtype=p.dtype))
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    alpha, step = 7.0, 3

    def zero():
        for p in [*z.parameters(), *y.parameters(), theta]:
            p.grad = None

    # accumulated: 2 ranks × 2 micro-batches, partial sums with global normalisers, summed grads
    for rank in range(2):
        batch = StepSampler(data, mode, val_batch=6, micro_batches=2, seed=5, rank=rank,
                            world_size=2, pad_token_id=tok.pad_token_id, **kw).batch(step)
        for tr, va in zip(batch.train, batch.val):
            ids = {k: tr[k] for k in ("input_ids", "attention_mask")}
            h_y = source_partial_sums(per_example_loss(y(**ids).logits, tr["labels"]),
                                      tr["source_ids"], batch.counts)
            h_z = source_partial_sums(per_example_loss(z(**ids).logits, tr["labels"]),
                                      tr["source_ids"], batch.counts)
            f = val_partial_sum(y(va["input_ids"], attention_mask=va["attention_mask"]).logits,
                                va["labels"], batch.val_tokens)
            sb.penalty_surrogate(theta, f, h_y, h_z, _combine, alpha).surrogate.backward()
    accumulated = _grads([z, y], theta)
    zero()

    # reference: the whole global batch in one micro-batch, per-source means and HF token mean
    big = StepSampler(data, mode, val_batch=6, micro_batches=1, seed=5,
                      pad_token_id=tok.pad_token_id, **kw).batch(step)
    (tr,), (va,) = big.train, big.val
    src = tr["source_ids"]

    def source_means(model):
        ell = per_example_loss(model(tr["input_ids"], attention_mask=tr["attention_mask"]).logits,
                               tr["labels"])
        return torch.stack([ell[src == k].mean() if (src == k).any() else ell.sum() * 0
                            for k in range(3)])

    logits = y(va["input_ids"], attention_mask=va["attention_mask"]).logits
    f = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                        va["labels"][:, 1:].reshape(-1), ignore_index=-100)
    sb.penalty_surrogate(theta, f, source_means(y), source_means(z), _combine, alpha
                         ).surrogate.backward()
    reference = _grads([z, y], theta)
    assert big.counts.tolist() == torch.bincount(src, minlength=3).tolist()
    assert theta.grad.abs().max() > 0
    for a, r in zip(accumulated, reference):
        assert_close(a, r)
