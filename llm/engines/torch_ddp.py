"""Plain-torch engine: one process, or data parallel over ``torch.distributed`` (``ddp=True``).

Why no ``DistributedDataParallel`` wrapper. DDP builds its gradient reducer once, over the params
that have ``requires_grad`` at construction; LISA flips ``requires_grad`` every ``period`` steps, so
DDP would have to be re-wrapped at each switch (or run ``find_unused_parameters``, an extra graph
traversal per backward). The ScaleBiO loop also calls ``backward`` once per micro-batch through two
models (u and w) and θ, and w is called twice (train and validation) before each backward; DDP would
all-reduce after every micro-batch unless every model is put under ``no_sync``. Instead the engine
all-reduces the accumulated grads of the *trainable* tensors once, in ``step``, in one flat buffer
per dtype: one collective per step, correct for any number of forwards/backwards, and inactive
blocks cost nothing. Initial weights are broadcast from rank 0, as DDP does.

Gradients are **averaged** over ranks (as DDP and FSDP2 do): a loss normalised by *global* counts
must be multiplied by the world size to get the gradient of the global-batch objective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from scalebio.llm.engines.engine import (
    LisaOptimizer,
    OptimizerSpec,
    clip_grad_norm,
    engine_state,
    load_engine_state,
)
from scalebio.llm.engines.lisa import LisaConfig, lisa_layout


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    # One flat buffer per dtype: a single collective instead of one per tensor. Every rank must
    # hold grads for the same tensors (same model, same code path), or the buffers mismatch.
    grads = [t.grad for t in tensors if t.grad is not None]
    world = dist.get_world_size()
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in same:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        del flat


class TorchEngine:
    """One model + its LISA-aware optimizer, single process or data parallel (module doc)."""

    def __init__(self, model: nn.Module, opt: OptimizerSpec, lisa: LisaConfig | None, ddp: bool):
        self.module = model
        self.ddp = ddp
        self.layout = lisa_layout(model, lisa)
        self._params = dict(model.named_parameters())
        names = {id(p): n for n, p in self._params.items()}
        self.opt = LisaOptimizer(self.layout, opt, names, active=None if lisa is None else [])

    def set_active_blocks(self, active: list[int] | None) -> None:
        """LISA switch (a no-op if the set is unchanged); ``None`` = every block trainable."""
        self.opt.set_active(active)

    def step(self, lr: float, clip: float | None) -> float:
        """All-reduce (ddp), clip, step at ``lr``, zero grads; return the pre-clip norm."""
        tensors = self.opt.prepare_grads()
        if self.ddp:
            _all_reduce_mean(tensors)
        norm = clip_grad_norm(tensors, clip)
        self.opt.step(lr)
        return norm

    def state_dict(self) -> dict:
        """Deep copy of weights, buffers, active blocks, optimizer state and masters."""
        return engine_state(self.module, self.opt)

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (bitwise)."""
        load_engine_state(self.module, self.opt, self._params, state)

    def full_model_state_dict(self) -> dict:
        """Full weights on CPU (every rank holds them all)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state plus fp32 masters."""
        return self.opt.state_bytes()


def build_single_engine(
    model: nn.Module, opt: OptimizerSpec, lisa: LisaConfig | None, ddp: bool = False
) -> TorchEngine:
    """Wrap ``model`` in a plain-torch engine.

    Args:
        model: an HF causal LM (any decoder family), already on its device and dtype. Non-fp32
            weights get fp32 masters while trainable.
        opt: optimizer hyperparameters.
        lisa: LISA config; with LISA only persistent params train until the first
            ``set_active_blocks``. ``None``: every parameter trains.
        ddp: data parallel over the initialised default process group (grads averaged, weights
            broadcast from rank 0 here).

    Returns:
        The engine.
    """
    if ddp:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("build_single_engine(ddp=True) needs torch.distributed initialised")
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
    return TorchEngine(model, opt, lisa, ddp)
