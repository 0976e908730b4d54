"""The LLM loop is thin: on a linear bigram "language model" in float64 it reproduces the core
solver's trajectory on the equivalent toy (per-source mean losses written independently)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import scalebio as sb
from scalebio.llm.data.batching import StepBatch
from scalebio.llm.engines.engine import OptimizerSpec
from scalebio.llm.engines.torch_engine import build_single_engine
from scalebio.llm.loop.step import Combine, bilevel_step

V, T, K, N_PER = 6, 5, 3, 4  # vocabulary, sequence length, sources, examples per source
# float64 round-off over 15 steps: the loop and the core solver add the same terms in another order
# (measured ≤ 9e-16); 1e-12 leaves a 1000x margin. A float32 detour anywhere (e.g. an fp32 master
# copy of the float64 weights in the engine) shows up as ~1e-7 and fails.
PARITY_TOL = 1e-12


class BigramLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: linear in its parameters, HF-shaped output."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (K * N_PER, T), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # the "prompt": no loss on the first two positions
    labels[torch.rand(labels.shape, generator=g) < 0.2] = -100  # ragged supervision
    labels[:, -1] = ids[:, -1]  # every example keeps at least one supervised target
    src = torch.arange(K).repeat_interleave(N_PER)
    val_ids = torch.randint(0, V, (5, T), generator=g)
    val_labels = val_ids.clone()
    val_labels[:, :1] = -100
    return ids, labels, src, val_ids, val_labels


def _reference_losses(table, ids, labels, src):
    """ℓ̄_k: mean over source k's examples of the token-mean CE (a second implementation)."""
    out = []
    for k in range(K):
        per = []
        for i in (src == k).nonzero()[:, 0]:
            m = labels[i, 1:] != -100
            ce = F.cross_entropy(table[ids[i, :-1]][m], labels[i, 1:][m], reduction="mean")
            per.append(ce)
        out.append(torch.stack(per).mean())
    return torch.stack(out)


def _reference_val(table, val_ids, val_labels):
    m = val_labels[:, 1:] != -100
    return F.cross_entropy(table[val_ids[:, :-1]][m], val_labels[:, 1:][m], reduction="mean")


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("order", ["simultaneous", "alternating"])
# (1, 0): the single-timescale loop; (2, 3): u takes 2 steps per step, λ frozen for 3 steps
@pytest.mark.parametrize("inner_steps,warmup", [(1, 0), (2, 3)])
def test_llm_loop_reproduces_core_trajectory(micro_batches, order, inner_steps, warmup):
    ids, labels, src, val_ids, val_labels = _data()
    g = torch.Generator().manual_seed(1)
    table0 = 0.3 * torch.randn(V, V, generator=g, dtype=torch.float64)
    alpha, lr_u, lr_w, lr_lam, steps = 3.0, 0.2, 0.2, 0.5, 15
    spec = sb.make_simplex(K)

    # ---- the core solver on the toy
    prob = sb.reweighting_problem(
        lambda y, b: _reference_val(y, val_ids, val_labels),
        lambda y, b: _reference_losses(y, ids, labels, src),
        spec,
    )
    cfg = sb.ScaleBiOConfig(
        alpha=alpha, opt_x=sb.sgd(lr_lam), opt_y=sb.sgd(lr_w), opt_z=sb.sgd(lr_u), order=order,
        inner_steps_z=inner_steps, x_warmup_steps=warmup,
    )
    core = sb.run(prob, sb.init_logits(spec, torch.float64), table0, cfg, steps, progress=False)

    # ---- the LLM loop's step on the same data, split into micro-batches
    eng_u = build_single_engine(BigramLM(table0), OptimizerSpec("sgd", lr_u), None)
    eng_w = build_single_engine(BigramLM(table0), OptimizerSpec("sgd", lr_w), None)
    theta = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt_theta = torch.optim.SGD([theta], lr=lr_lam)
    train_parts = torch.arange(len(ids)).chunk(micro_batches)
    val_parts = torch.arange(len(val_ids)).chunk(micro_batches)
    batch = StepBatch(
        train=[
            {
                "input_ids": ids[p],
                "attention_mask": torch.ones_like(ids[p]),
                "labels": labels[p],
                "source_ids": src[p],
            }
            for p in train_parts
        ],
        val=[
            {
                "input_ids": val_ids[p],
                "attention_mask": torch.ones_like(val_ids[p]),
                "labels": val_labels[p],
            }
            for p in val_parts
        ],
        counts=torch.bincount(src, minlength=K),
        val_tokens=int((val_labels[:, 1:] != -100).sum()),
    )
    combine = Combine(spec)
    for t in range(steps):
        # the toy's data are deterministic: u's extra steps see the same batch as the core's
        m = bilevel_step(
            eng_u, eng_w, theta, opt_theta, batch, combine, alpha, (lr_u, lr_w, lr_lam), None,
            order, inner_batches=[batch] * (inner_steps - 1), update_lambda=t >= warmup,
        )
        if t < warmup:
            assert torch.equal(theta.detach(), torch.zeros(K, dtype=torch.float64))
        assert_close(m["weights"], core.history[t].weights, atol=PARITY_TOL, rtol=0)
        assert_close(float(m["sums"][0]), core.history[t].upper, atol=PARITY_TOL, rtol=0)
    assert_close(theta.detach(), core.state.x.detach(), atol=PARITY_TOL, rtol=0)
    assert_close(eng_w.module.table.detach(), core.state.y.detach(), atol=PARITY_TOL, rtol=0)
    assert_close(eng_u.module.table.detach(), core.state.z.detach(), atol=PARITY_TOL, rtol=0)
    # and the weights really moved, so the comparison is not between two idle runs
    assert float((core.history[-1].weights - 1 / K).abs().max()) > 1e-3
