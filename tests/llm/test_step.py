"""The one-graph-at-a-time ScaleBiO step gives the gradients of the single-backward step.

``bilevel_step`` runs a backward after each forward (u on train, w on train, w on validation).
The second implementation below, ``_single_backward_step``, is the former code path kept only here:
one backward of the whole penalty surrogate per micro-batch. Both run on tiny float64 Llamas with
engines that record the (rank-averaged) gradients instead of stepping, for u, w and λ, with 1 and 3
micro-batches, both orders, on 1 rank here and on 2 gloo ranks in a subprocess (this file run as a
script under ``torch.distributed.run``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_models import VOCAB, tiny_model

from scalebio import make_simplex, penalty_surrogate
from scalebio.llm.data.batching import StepBatch
from scalebio.llm.loop.losses import per_example_loss, source_partial_sums, val_partial_sum
from scalebio.llm.loop.step import Combine, _forward_losses, bilevel_step

K, PER_SOURCE, N_VAL, T, ALPHA = 3, 2, 6, 10, 3.0
# float64: the two implementations add the same O(1) terms (2 to 3 pieces per micro-batch, M
# micro-batches, 2 ranks) in a different order, so they differ by a few ulps of the largest term,
# ~1e-15 for gradients of size ≤ 10 (measured ≤ 1.2e-16); 1e-12 leaves three orders of margin and
# is still ten orders below the gradients compared (each checked to exceed GRAD_FLOOR).
GRAD_TOL = 1e-12
GRAD_FLOOR = 1e-3
# Saved-activation peak of the one-graph step over the single-backward one, simultaneous order:
# three graphs of similar size become one at a time, so ~1/3 (measured 0.34); 0.5 fails if two
# graphs were ever alive together.
GRAPH_PEAK_RATIO = 0.5


class _Recorder:
    """An engine that averages grads over ranks (as the DDP engine does), keeps a copy, and
    zeroes them instead of stepping: u and w keep their weights, so both orders see the same u."""

    def __init__(self, module):
        self.module = module
        self.grads: dict[str, torch.Tensor] = {}

    def step(self, lr, clip) -> float:
        for name, p in self.module.named_parameters():
            if p.grad is None:
                continue
            if dist.is_initialized():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
            self.grads[name] = p.grad.clone()
            p.grad = None
        return 0.0


class _ThetaRecorder:
    """The λ optimizer: records λ's gradient at ``step``."""

    def __init__(self, theta):
        self.theta, self.grad, self.param_groups = theta, None, [{}]

    def step(self):
        self.grad = self.theta.grad.clone()

    def zero_grad(self, set_to_none=True):
        self.theta.grad = None


def _single_backward_step(eng_u, eng_w, theta, opt_theta, batch, combine, alpha, order, world):
    """The former step, reference only: one backward of the whole surrogate per micro-batch."""
    counts = batch.counts
    sums = torch.zeros(3 + 2 * theta.numel(), dtype=torch.float64)
    if order == "alternating":
        for tr in batch.train:
            h_u = source_partial_sums(per_example_loss(*_forward_losses(eng_u.module, tr, None)),
                                      tr["source_ids"], counts)
            zero = torch.zeros((), dtype=h_u.dtype)
            terms = penalty_surrogate(theta, zero, h_u.detach(), h_u, combine, alpha)
            (terms.surrogate * world).backward()
        theta.grad = None
        eng_u.step(0.0, None)
    for tr, va in zip(batch.train, batch.val):
        src = tr["source_ids"]
        h_w = source_partial_sums(per_example_loss(*_forward_losses(eng_w.module, tr, None)),
                                  src, counts)
        with torch.set_grad_enabled(order == "simultaneous"):
            h_u = source_partial_sums(per_example_loss(*_forward_losses(eng_u.module, tr, None)),
                                      src, counts)
        f = val_partial_sum(*_forward_losses(eng_w.module, va, None), batch.val_tokens)
        terms = penalty_surrogate(theta, f, h_w, h_u, combine, alpha)
        (terms.surrogate * world).backward()
        sums += torch.cat([torch.stack([terms.upper, terms.lower_y, terms.lower_z]).double(),
                           h_w.detach().double(), h_u.detach().double()])
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(theta.grad)
        theta.grad /= world
    if order == "simultaneous":
        eng_u.step(0.0, None)
    eng_w.step(0.0, None)
    opt_theta.step()
    opt_theta.zero_grad()
    return sums


def _global_batch():
    """K sources × PER_SOURCE examples and N_VAL validation rows, ragged supervision."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (K * PER_SOURCE, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[torch.rand(labels.shape, generator=g) < 0.2] = -100
    labels[:, -1] = ids[:, -1]
    src = torch.arange(K).repeat(PER_SOURCE)  # every chunk below holds several sources
    val_ids = torch.randint(3, VOCAB, (N_VAL, T), generator=g)
    val_labels = val_ids.clone()
    val_labels[:, :2] = -100
    return ids, labels, src, val_ids, val_labels


def _batch(rows: torch.Tensor, val_rows: torch.Tensor, micro: int) -> StepBatch:
    """This rank's rows of the global batch in ``micro`` micro-batches; global normalisers."""
    ids, labels, src, val_ids, val_labels = _global_batch()
    train = [{"input_ids": ids[p], "attention_mask": torch.ones_like(ids[p]), "labels": labels[p],
              "source_ids": src[p]} for p in rows.chunk(micro)]
    val = [{"input_ids": val_ids[p], "attention_mask": torch.ones_like(val_ids[p]),
            "labels": val_labels[p]} for p in val_rows.chunk(micro)]
    return StepBatch(train=train, val=val, counts=torch.bincount(src, minlength=K),
                     val_tokens=int((val_labels[:, 1:] != -100).sum()))


def _run(step_fn, batch, order: str, world: int) -> dict[str, torch.Tensor]:
    """Gradients of u, w, λ (flattened, keyed) and the metric sums after one step of step_fn."""
    # u and w differ (seeds 0 and 1), so a gradient sent to the wrong copy cannot go unnoticed;
    # block 1 of u is frozen, as LISA leaves inactive blocks.
    eng_u = _Recorder(tiny_model("llama", seed=0, dtype=torch.float64))
    eng_w = _Recorder(tiny_model("llama", seed=1, dtype=torch.float64))
    for p in eng_u.module.model.layers[1].parameters():
        p.requires_grad_(False)
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt_theta = _ThetaRecorder(theta)
    combine = Combine(make_simplex(K))
    if step_fn is bilevel_step:
        sums = bilevel_step(eng_u, eng_w, theta, opt_theta, batch, combine, ALPHA, (0.0,) * 3,
                            None, order, world)["sums"]
    else:
        sums = _single_backward_step(eng_u, eng_w, theta, opt_theta, batch, combine, ALPHA,
                                     order, world)
    out = {f"u.{n}": g for n, g in eng_u.grads.items()}
    out.update({f"w.{n}": g for n, g in eng_w.grads.items()})
    out["lambda"], out["sums"] = opt_theta.grad, sums
    return out


def _max_diffs(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


def _check_nontrivial(grads: dict) -> None:
    for prefix in ("u.", "w.", "lambda"):
        top = max(float(g.abs().max()) for k, g in grads.items() if k.startswith(prefix))
        assert top > GRAD_FLOOR, (prefix, top)
    assert not any(k.startswith("u.model.layers.1.") for k in grads)  # frozen block: no grad


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("order", ["simultaneous", "alternating"])
def test_one_graph_step_matches_single_backward(micro, order):
    batch = _batch(torch.arange(K * PER_SOURCE), torch.arange(N_VAL), micro)
    new = _run(bilevel_step, batch, order, 1)
    ref = _run(_single_backward_step, batch, order, 1)
    _check_nontrivial(ref)
    assert max(_max_diffs(new, ref).values()) <= GRAD_TOL


def _batch_without(absent: int) -> StepBatch:
    """The global batch less source ``absent``'s rows, as a uniform draw may come out (c = 0)."""
    ids, labels, src, val_ids, val_labels = _global_batch()
    keep = src != absent
    train = [{"input_ids": ids[keep], "attention_mask": torch.ones_like(ids[keep]),
              "labels": labels[keep], "source_ids": src[keep]}]
    val = [{"input_ids": val_ids, "attention_mask": torch.ones_like(val_ids),
            "labels": val_labels}]
    return StepBatch(train=train, val=val, counts=torch.bincount(src[keep], minlength=K),
                     val_tokens=int((val_labels[:, 1:] != -100).sum()))


def test_absent_source_gets_no_lambda_gradient():
    """Uniform batches: source 2 absent. Without the mask its λ gradient would be the softmax
    Jacobian's −α π_2 Σ_j π_j Δ_j (Δ = ℓ̄(w) − ℓ̄(u), Δ_2 = 0); the step zeroes it and leaves the
    present sources' entries as the reference computes them."""
    batch = _batch_without(2)
    new = _run(bilevel_step, batch, "simultaneous", 1)
    ref = _run(_single_backward_step, batch, "simultaneous", 1)
    _check_nontrivial(ref)
    assert float(new["lambda"][2]) == 0.0
    assert float((new["lambda"][:2] - ref["lambda"][:2]).abs().max()) <= GRAD_TOL
    # the reference's (unmasked) entry is the closed form, and large enough for the mask to matter
    pi = torch.softmax(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), 0)  # uniform prior
    delta = ref["sums"][3:3 + K] - ref["sums"][3 + K:]
    expected = -ALPHA * pi[2] * (pi * delta).sum()
    assert abs(float(ref["lambda"][2]) - float(expected)) <= GRAD_TOL
    assert abs(float(expected)) > GRAD_FLOOR


def test_absent_source_logit_holds_under_adam_momentum():
    """AdamW would move an absent source's logit on its momentum alone; the step holds it."""
    eng_u = _Recorder(tiny_model("llama", seed=0, dtype=torch.float64))
    eng_w = _Recorder(tiny_model("llama", seed=1, dtype=torch.float64))
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([theta], lr=0.1, weight_decay=0.0)
    combine, lrs = Combine(make_simplex(K)), (0.0, 0.0, 0.1)
    full = _batch(torch.arange(K * PER_SOURCE), torch.arange(N_VAL), 1)
    bilevel_step(eng_u, eng_w, theta, opt, full, combine, ALPHA, lrs, None)  # builds momentum
    before = theta.detach().clone()
    bilevel_step(eng_u, eng_w, theta, opt, _batch_without(2), combine, ALPHA, lrs, None)
    after = theta.detach()
    assert float(after[2]) == float(before[2])
    assert float((after[:2] - before[:2]).abs().min()) > GRAD_FLOOR  # the present ones moved


def test_lambda_warmup_leaves_lambda_and_its_optimizer_untouched():
    eng_u = _Recorder(tiny_model("llama", seed=0, dtype=torch.float64))
    eng_w = _Recorder(tiny_model("llama", seed=1, dtype=torch.float64))
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([theta], lr=0.1, weight_decay=0.0)
    full = _batch(torch.arange(K * PER_SOURCE), torch.arange(N_VAL), 1)
    m = bilevel_step(eng_u, eng_w, theta, opt, full, Combine(make_simplex(K)), ALPHA,
                     (0.0, 0.0, 0.1), None, update_lambda=False)
    assert torch.equal(theta.detach(), torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    assert not opt.state and theta.grad is None and m["grad_norm_lambda"] > GRAD_FLOOR


def _saved_peak(step_fn) -> int:
    """Peak bytes of tensors saved for backward and not yet released, over one step."""
    live: dict[int, int] = {}
    peak = [0]

    class Box:
        __slots__ = ("t", "__weakref__")

    def pack(t):
        box = Box()
        box.t = t
        live[id(box)] = t.numel() * t.element_size()
        weakref.finalize(box, live.pop, id(box), None)
        peak[0] = max(peak[0], sum(live.values()))
        return box

    batch = _batch(torch.arange(K * PER_SOURCE), torch.arange(K * PER_SOURCE), 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        _run(step_fn, batch, "simultaneous", 1)
    return peak[0]


def test_one_graph_alive_at_a_time():
    ratio = _saved_peak(bilevel_step) / _saved_peak(_single_backward_step)
    assert ratio <= GRAPH_PEAK_RATIO, ratio


def test_two_ranks_match_one_rank_and_the_reference(tmp_path):
    """2 gloo ranks, each with half the global batch: the rank-averaged grads equal the one-rank
    grads of the whole batch (world-size factor), and the reference on 2 ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2
    for order in ("simultaneous", "alternating"):
        two = torch.load(tmp_path / f"{order}.pt")
        one = _run(bilevel_step, _batch(torch.arange(K * PER_SOURCE), torch.arange(N_VAL), 2),
                   order, 1)
        _check_nontrivial(one)
        assert max(_max_diffs(two, one).values()) <= GRAD_TOL, order
        assert result[order] <= GRAD_TOL, order


def _rank_main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 ranks, got {world}"
    n, nv = K * PER_SOURCE // world, N_VAL // world
    batch = _batch(torch.arange(rank * n, (rank + 1) * n), torch.arange(rank * nv, (rank + 1) * nv),
                   1)
    result = {"world": world}
    for order in ("simultaneous", "alternating"):
        new = _run(bilevel_step, batch, order, world)
        ref = _run(_single_backward_step, batch, order, world)
        result[order] = max(_max_diffs(new, ref).values())
        if rank == 0:
            torch.save(new, out / f"{order}.pt")
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # the script's folder is on sys.path: tiny_models imports
    _rank_main(Path(sys.argv[1]))
