"""One solver step equals the hand-written minimax update; options do what they say."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import scalebio as sb


def _quadratic(seed: int = 0):
    """f = ½‖y − b‖² + ½ c‖x‖², g = ½‖y − A x‖² + ¼‖y‖⁴-free convex extra term."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)

    def f(x, y, batch):
        return 0.5 * ((y - b) ** 2).sum() + 0.05 * (x**2).sum()

    def lower(x, y, batch):
        return 0.5 * ((y - a @ x) ** 2).sum() + 0.1 * torch.exp(0.3 * y).sum()

    x0 = torch.randn(3, generator=g, dtype=torch.float64)
    y0 = torch.randn(4, generator=g, dtype=torch.float64)
    z0 = torch.randn(4, generator=g, dtype=torch.float64)
    return sb.generic_problem(f, lower), f, lower, x0, y0, z0


def _psi_grads(f, lower, x, y, z, alpha):
    x, y, z = (t.detach().clone().requires_grad_(True) for t in (x, y, z))
    psi = f(x, y, None) + alpha * (lower(x, y, None) - lower(x, z, None))
    return torch.autograd.grad(psi, [x, y, z])


def test_simultaneous_sgd_step_is_gradient_descent_ascent():
    prob, f, lower, x0, y0, z0 = _quadratic()
    cfg = sb.ScaleBiOConfig(alpha=3.0, opt_x=sb.sgd(0.1), opt_y=sb.sgd(0.02), opt_z=sb.sgd(0.03))
    state = sb.init(prob, x0, y0, cfg, z0=z0)
    state, m = sb.step(prob, state, cfg)
    gx, gy, gz = _psi_grads(f, lower, x0, y0, z0, 3.0)
    assert_close(state.x.detach(), x0 - 0.1 * gx)
    assert_close(state.y.detach(), y0 - 0.02 * gy)
    assert_close(state.z.detach(), z0 + 0.03 * gz)  # z *ascends* on Ψ
    assert_close(m.hypergrad, gx)
    assert m.step == 0 and state.step == 1


def test_alternating_order_steps_z_first():
    prob, f, lower, x0, y0, z0 = _quadratic(1)
    cfg = sb.ScaleBiOConfig(
        alpha=2.0, opt_x=sb.sgd(0.1), opt_y=sb.sgd(0.05), opt_z=sb.sgd(0.05), order="alternating"
    )
    state = sb.init(prob, x0, y0, cfg, z0=z0)
    state, _ = sb.step(prob, state, cfg)
    _, _, gz = _psi_grads(f, lower, x0, y0, z0, 2.0)
    z1 = z0 + 0.05 * gz
    gx, gy, _ = _psi_grads(f, lower, x0, y0, z1, 2.0)
    assert_close(state.z.detach(), z1)
    assert_close(state.x.detach(), x0 - 0.1 * gx)
    assert_close(state.y.detach(), y0 - 0.05 * gy)


def test_adamw_steps_match_torch_adamw_on_psi_gradients():
    prob, f, lower, x0, y0, z0 = _quadratic(2)
    cfg = sb.ScaleBiOConfig(
        alpha=5.0,
        opt_x=sb.adamw(1e-2),
        opt_y=sb.adamw(2e-2),
        opt_z=sb.adamw(3e-2, weight_decay=0.1),
    )
    state = sb.init(prob, x0, y0, cfg, z0=z0)
    ref = [t.clone().requires_grad_(True) for t in (x0, y0, z0)]
    ref_opts = [
        torch.optim.AdamW([ref[0]], lr=1e-2, weight_decay=0.0),
        torch.optim.AdamW([ref[1]], lr=2e-2, weight_decay=0.0),
        torch.optim.AdamW([ref[2]], lr=3e-2, weight_decay=0.1),
    ]
    for _ in range(5):
        state, _ = sb.step(prob, state, cfg)
        gx, gy, gz = _psi_grads(f, lower, *ref, 5.0)
        for p, gr, o in zip(ref, (gx, gy, -gz), ref_opts):
            p.grad = gr
            o.step()
    assert_close(state.x.detach(), ref[0].detach())
    assert_close(state.y.detach(), ref[1].detach())
    assert_close(state.z.detach(), ref[2].detach())


def test_geometric_alpha_scales_step_sizes_inversely():
    prob, f, lower, x0, y0, z0 = _quadratic(3)
    cfg = sb.ScaleBiOConfig(
        alpha=2.0,
        opt_x=sb.sgd(0.1),
        opt_y=sb.sgd(0.01),
        opt_z=sb.sgd(0.01),
        alpha_schedule=sb.geometric_alpha(tau=10.0, every=2),
    )
    state = sb.init(prob, x0, y0, cfg, z0=z0)
    alphas = []
    for _ in range(5):
        before = (state.x.detach().clone(), state.y.detach().clone(), state.z.detach().clone())
        state, m = sb.step(prob, state, cfg)
        alphas.append(m.alpha)
        gx, gy, gz = _psi_grads(f, lower, *before, m.alpha)
        factor = 2.0 / m.alpha
        assert_close(state.x.detach(), before[0] - 0.1 * factor * gx)
        assert_close(state.z.detach(), before[2] + 0.01 * factor * gz)
    assert alphas == [2.0, 2.0, 20.0, 20.0, 200.0]


def test_clipping_bounds_each_direction():
    prob, f, lower, x0, y0, z0 = _quadratic(4)
    clip = 1e-3  # far below every gradient norm here, so every direction is clipped
    cfg = sb.ScaleBiOConfig(
        alpha=3.0,
        opt_x=sb.sgd(1.0),
        opt_y=sb.sgd(1.0),
        opt_z=sb.sgd(1.0),
        clip_x=clip,
        clip_y=clip,
        clip_z=clip,
    )
    state = sb.init(prob, x0, y0, cfg, z0=z0)
    state, _ = sb.step(prob, state, cfg)
    gx, gy, gz = _psi_grads(f, lower, x0, y0, z0, 3.0)
    assert_close(state.x.detach(), x0 - clip * gx / gx.norm())
    assert_close(state.y.detach(), y0 - clip * gy / gy.norm())
    assert_close(state.z.detach(), z0 + clip * gz / gz.norm())


def test_x_warmup_skips_the_whole_x_step():
    prob, _, _, x0, y0, z0 = _quadratic(5)
    cfg = sb.ScaleBiOConfig(alpha=3.0, x_warmup_steps=3)
    state = sb.init(prob, x0, y0, cfg, z0=z0)
    for _ in range(3):
        state, _ = sb.step(prob, state, cfg)
    assert torch.equal(state.x.detach(), x0) and not torch.equal(state.y.detach(), y0)
    state, _ = sb.step(prob, state, cfg)
    assert not torch.equal(state.x.detach(), x0)


def test_x_warmup_steps_is_the_lambda_warmup():
    """With K = 2 too, the warm-up moves y and z exactly as a run whose x has step size 0."""
    prob, _, _, x0, y0, z0 = _quadratic(6)
    cfg = sb.ScaleBiOConfig(alpha=3.0, x_warmup_steps=2, inner_steps_z=2)
    frozen = sb.ScaleBiOConfig(alpha=3.0, opt_x=sb.sgd(0.0), inner_steps_z=2)
    state, ref = sb.init(prob, x0, y0, cfg, z0=z0), sb.init(prob, x0, y0, frozen, z0=z0)
    for _ in range(2):
        state, _ = sb.step(prob, state, cfg)
        ref, _ = sb.step(prob, ref, frozen)
    assert torch.equal(state.x.detach(), x0)
    assert torch.equal(state.y.detach(), ref.y.detach())
    assert torch.equal(state.z.detach(), ref.z.detach())


@pytest.mark.parametrize("order", ["simultaneous", "alternating"])
def test_inner_steps_z_take_extra_z_steps_on_their_batches(order):
    """K = 2: one z step on the fresh batch ξ₁ at (x0, y0), then the usual step on ξ₀."""
    _, f, lower, x0, y0, z0 = _quadratic(7)
    xi = torch.randn(2, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def noisy(x, y, batch):  # g(x, y; ξ) = g(x, y) − ξᵀy: the batch changes d_z
        return lower(x, y, None) - batch @ y

    prob = sb.generic_problem(f, noisy)
    a, lx, ly, lz = 2.0, 0.1, 0.05, 0.04
    cfg = sb.ScaleBiOConfig(alpha=a, opt_x=sb.sgd(lx), opt_y=sb.sgd(ly), opt_z=sb.sgd(lz),
                            order=order, inner_steps_z=2)
    state, m = sb.step(prob, sb.init(prob, x0, y0, cfg, z0=z0), cfg, xi[0], [xi[1]])

    def grads(x, y, z, b):
        x, y, z = (t.detach().clone().requires_grad_(True) for t in (x, y, z))
        psi = f(x, y, None) + a * (noisy(x, y, b) - noisy(x, z, b))
        return torch.autograd.grad(psi, [x, y, z])

    z1 = z0 + lz * grads(x0, y0, z0, xi[1])[2]  # the extra step, on ξ₁ (z ascends on Ψ)
    gx, gy, gz = grads(x0, y0, z1, xi[0])
    z2 = z1 + lz * gz
    if order == "alternating":  # x and y see z after all K = 2 steps
        gx, gy, _ = grads(x0, y0, z2, xi[0])
    assert_close(state.z.detach(), z2)
    assert_close(state.x.detach(), x0 - lx * gx)
    assert_close(state.y.detach(), y0 - ly * gy)
    assert_close(m.hypergrad, gx)


def test_module_variable_matches_tensor_variable():
    """Per-source losses of an nn.Linear model equal the same losses written on its weights."""
    g = torch.Generator().manual_seed(6)
    feats = [torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    targets = [torch.randn(8, generator=g, dtype=torch.float64) for _ in range(3)]
    xv, yv = (
        torch.randn(8, 3, generator=g, dtype=torch.float64),
        torch.randn(8, generator=g, dtype=torch.float64),
    )
    spec = sb.make_simplex(3)

    def losses_module(model, batch):
        return torch.stack(
            [((model(a).squeeze(-1) - t) ** 2).mean() for a, t in zip(feats, targets)]
        )

    def losses_tensor(w, batch):
        return torch.stack([((a @ w - t) ** 2).mean() for a, t in zip(feats, targets)])

    model = nn.Linear(3, 1, bias=False).double()
    w0 = torch.randn(3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w0[None])
    cfg = sb.ScaleBiOConfig(alpha=4.0, opt_x=sb.sgd(0.5), opt_y=sb.sgd(0.05), opt_z=sb.sgd(0.05))
    pm = sb.reweighting_problem(
        lambda m, b: ((m(xv).squeeze(-1) - yv) ** 2).mean(), losses_module, spec
    )
    pt = sb.reweighting_problem(lambda w, b: ((xv @ w - yv) ** 2).mean(), losses_tensor, spec)
    rm = sb.run(
        pm, sb.init_logits(spec, torch.float64), copy.deepcopy(model), cfg, 20, progress=False
    )
    rt = sb.run(pt, sb.init_logits(spec, torch.float64), w0, cfg, 20, progress=False)
    assert_close(rm.state.x.detach(), rt.state.x.detach())
    assert_close(rm.state.y.weight.detach()[0], rt.state.y.detach())
    assert_close(rm.state.z.weight.detach()[0], rt.state.z.detach())


def test_reweighting_metrics_and_list_of_closures():
    g = torch.Generator().manual_seed(7)
    centers = torch.randn(3, 2, generator=g, dtype=torch.float64)
    spec = sb.make_simplex(3)
    closures = [lambda w, b, c=c: 0.5 * ((w - c) ** 2).sum() for c in centers]
    prob = sb.reweighting_problem(lambda w, b: 0.5 * ((w - centers[0]) ** 2).sum(), closures, spec)
    cfg = sb.ScaleBiOConfig(alpha=10.0, opt_x=sb.sgd(0.5), opt_y=sb.sgd(0.05), opt_z=sb.sgd(0.05))
    res = sb.run(
        prob,
        sb.init_logits(spec, torch.float64),
        torch.zeros(2, dtype=torch.float64),
        cfg,
        300,
        progress=False,
    )
    ws = torch.stack([m.weights for m in res.history])
    assert_close(res.avg_weights, ws.mean(0))
    assert_close(ws.sum(1), torch.ones(len(ws), dtype=torch.float64))
    # the validation loss is source 0's own loss, so source 0 must end with the largest weight
    assert int(res.weights.argmax()) == 0
    assert res.history[-1].gap >= -1e-12  # g(x, y) ≥ g(x, z) once z tracks the lower minimiser


def test_bad_inputs_are_named():
    prob, *_, x0, y0, z0 = _quadratic()
    with pytest.raises(ValueError, match="alpha"):
        sb.ScaleBiOConfig(alpha=0.0)
    with pytest.raises(ValueError, match="order"):
        sb.ScaleBiOConfig(order="gauss-seidel")
    with pytest.raises(ValueError, match="clip_y"):
        sb.ScaleBiOConfig(clip_y=-1.0)
    with pytest.raises(ValueError, match="inner_steps_z"):
        sb.ScaleBiOConfig(inner_steps_z=0)
    cfg2 = sb.ScaleBiOConfig(inner_steps_z=2)
    with pytest.raises(ValueError, match="inner_batches"):
        sb.step(prob, sb.init(prob, x0, y0, cfg2), cfg2, None, [None, None])
    with pytest.raises(ValueError, match="z0"):
        sb.init(prob, x0, y0, sb.ScaleBiOConfig(), z0=z0[:2])
    with pytest.raises(ValueError, match="tau"):
        sb.geometric_alpha(tau=0.5, every=3)
    with pytest.raises(ValueError, match="num_steps"):
        sb.run(prob, x0, y0, sb.ScaleBiOConfig(), 0)
    spec = sb.make_simplex(2)
    rp = sb.reweighting_problem(lambda w, b: w.sum(), lambda w, b: torch.stack([w.sum()] * 3), spec)
    with pytest.raises(ValueError, match="source_losses"):
        sb.step(
            rp,
            sb.init(rp, torch.zeros(2), torch.zeros(1), sb.ScaleBiOConfig()),
            sb.ScaleBiOConfig(),
        )
    with pytest.raises(ValueError, match="source_losses"):
        sb.reweighting_problem(lambda w, b: w.sum(), [lambda w, b: w.sum()], spec)
    with pytest.raises(ValueError, match="num_sources"):
        sb.make_simplex(0)
