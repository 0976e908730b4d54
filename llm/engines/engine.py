"""The ``Engine`` protocol, ``OptimizerSpec`` and helpers shared by every training engine.

An engine owns one model copy (u or w) and its optimizer. The loop calls ``engine.module`` for
forwards, one ``backward`` through both models and θ, then ``engine.step(lr, clip)`` on each engine.

``LisaOptimizer`` is the LISA-aware optimizer of the torch engine (llm/engines/torch_engine.py:
single process, DDP and FSDP2). It keeps optimizer state only for trainable tensors: at each
switch the optimizer is rebuilt over ``persistent + active blocks``. The state of every tensor
trainable both before and after the switch is carried over (persistent params, and a block drawn
again in the next period, which therefore steps exactly like an AdamW that never stopped); the
state of blocks that go inactive is freed, so **a block re-activated after an absence restarts its
Adam moments and step count from zero**, like a fresh LISA draw. Params that are not float32 (bf16
weights) get an fp32 master copy while trainable; a block's master is dropped when the block goes
inactive and rebuilt from the low-precision weights when it comes back (its sub-bf16 bits are
lost, as when resuming from a bf16 checkpoint).

fp32 gradient accumulation (``fp32_grad_accum``, on by default): with bf16 weights, autograd
accumulates the micro-batch gradients of one step in bf16, so each addition rounds the running
sum to 8 mantissa bits. Instead a post-accumulate-grad hook on each trainable bf16 param adds the
micro-batch gradient into its fp32 master's ``.grad`` and frees the bf16 one: only each
micro-batch's own contribution is rounded to bf16 (docs/engines.md, "Precision").
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from scalebio.llm.engines.lisa import LisaLayout, apply_active_blocks, check_active

_OPTIMIZERS = ("adamw", "sgd")


class Engine(Protocol):
    """What the training loop needs from one model's engine (duck-typed)."""

    module: nn.Module
    layout: LisaLayout  # the model's blocks / persistent / frozen parameters (LISA policy)

    def step(self, lr: float, clip: float | None) -> float:
        """Clip the grad norm (None = off), optimizer step at ``lr``, zero grads; return the
        pre-clip global grad norm."""
        ...

    def set_active_blocks(self, active: list[int] | None) -> None:
        """LISA switch; ``None`` = every block trainable."""
        ...

    def state_dict(self) -> dict:
        """Model + optimizer state for checkpoint/resume. An engine whose ``checkpoint_format``
        is ``"dcp"`` (the torch engine) is saved with torch.distributed.checkpoint and also
        offers ``checkpoint_template``, so any world size can load it; any other engine's state
        is saved per rank and loads only at the world size that wrote it
        (docs/engines.md, "Checkpoints")."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Inverse of ``state_dict``."""
        ...

    def full_model_state_dict(self) -> dict:
        """Gathered full weights (on rank 0; may be empty on other ranks)."""
        ...

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state (+ fp32 masters) held by this rank."""
        ...


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer hyperparameters (the lr given here is only the initial one: ``step`` sets it).

    Attributes:
        name: ``"adamw"`` or ``"sgd"`` (plain SGD, no momentum).
        lr: learning rate.
        betas: AdamW (β1, β2).
        eps: AdamW ε.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
    """

    name: str = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise ValueError(f"OptimizerSpec.name must be one of {_OPTIMIZERS}, got {self.name!r}")
        if not self.lr >= 0.0:
            raise ValueError(f"OptimizerSpec.lr must be >= 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimizerSpec.betas must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0.0:
            raise ValueError(f"OptimizerSpec.eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"OptimizerSpec.weight_decay must be >= 0, got {self.weight_decay}")


def make_optimizer(spec: OptimizerSpec, groups: list[list[torch.Tensor]]) -> torch.optim.Optimizer:
    """A torch optimizer over the non-empty ``groups`` (one param group each)."""
    param_groups = [{"params": g} for g in groups if g]
    if not param_groups:
        raise ValueError("make_optimizer: no trainable parameters (check LisaConfig and active)")
    if spec.name == "adamw":
        return torch.optim.AdamW(
            param_groups, lr=spec.lr, betas=spec.betas, eps=spec.eps,
            weight_decay=spec.weight_decay,
        )
    return torch.optim.SGD(param_groups, lr=spec.lr, weight_decay=spec.weight_decay)


# ---------------------------------------------------------------------------- byte counting
def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor's memory on this rank is its local shard.
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors count their local shard)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = _local(t).untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the garbage collector can see (leak checks)."""
    gc.collect()
    # type() rather than isinstance(): isinstance reads __class__, which some module objects turn
    # into a deprecation warning or a ReferenceError (dead weakref proxies).
    return tensor_bytes(o for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


# ---------------------------------------------------------------------------- clipping
def clip_grad_norm(tensors: list[torch.Tensor], clip: float | None) -> float:
    """Global 2-norm of the grads of ``tensors``, then scale them to norm ≤ ``clip``.

    Same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (coefficient
    ``min(1, clip / (‖g‖ + 1e-6))``); DTensor grads are reduced across ranks.

    Returns:
        The pre-clip norm as a float.
    """
    if clip is not None and not clip > 0.0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if clip is not None:
        coef = torch.clamp(clip / (norm + 1e-6), max=1.0).item()  # exact fp32 value as a float
        for g in grads:
            g.mul_(coef)
    return float(norm)


# ---------------------------------------------------------------------------- LISA optimizer
class LisaOptimizer:
    """Optimizer + fp32 masters over the currently trainable params of one model (module doc).

    Args:
        layout: the model's LISA layout.
        spec: optimizer hyperparameters.
        names: parameter id → dotted name (checkpoint keys).
        active: the blocks trainable at first (``None`` = all; ``[]`` = only persistent params,
            so that no state or master is made for blocks before the first LISA draw).
        fp32_grad_accum: accumulate the micro-batch gradients of low-precision params in their
            fp32 master's ``.grad`` (module doc); ignored for fp32 params.
    """

    def __init__(
        self, layout: LisaLayout, spec: OptimizerSpec, names: dict[int, str],
        active: list[int] | None = None, fp32_grad_accum: bool = True,
    ):
        self.layout, self.spec, self.names = layout, spec, names
        self.fp32_grad_accum = fp32_grad_accum
        self.active: list[int] | None = None
        self.masters: dict[int, torch.Tensor] = {}  # id(param) -> fp32 master
        self._hooks: dict[int, object] = {}  # id(param) -> post-accumulate-grad hook handle
        self.params = {id(p): p for ps in layout.blocks for p in ps}
        self.params.update({id(p): p for p in layout.persistent})
        self.optimizer: torch.optim.Optimizer | None = None
        self.set_active(active, force=True)

    def _opt_tensor(self, p: nn.Parameter) -> torch.Tensor:
        if p.dtype in (torch.float32, torch.float64):  # masters only for 16-bit weights
            return p
        if id(p) not in self.masters:
            self.masters[id(p)] = p.detach().to(torch.float32).clone()
        return self.masters[id(p)]

    def _accumulate(self, p: nn.Parameter) -> None:
        # Runs after autograd (or FSDP2's reduce-scatter) has put this micro-batch's gradient in
        # p.grad, which was None before: move it into the fp32 sum, so p.grad is None again.
        master = self.masters.get(id(p))
        if master is None or p.grad is None:
            return
        if master.grad is None:
            master.grad = p.grad.to(torch.float32)
        else:
            master.grad.add_(p.grad)
        p.grad = None

    def trainable(self) -> list[nn.Parameter]:
        """Persistent params then active blocks' params, in a fixed order."""
        blocks = range(len(self.layout.blocks)) if self.active is None else self.active
        return list(self.layout.persistent) + [p for i in blocks for p in self.layout.blocks[i]]

    def set_active(self, active: list[int] | None, force: bool = False) -> None:
        """Switch the trainable blocks; a no-op (state kept) if the set does not change."""
        active = check_active(active, len(self.layout.blocks))
        if active == self.active and not force:
            return
        self.active = active
        apply_active_blocks(self.layout, active)
        trainable = self.trainable()
        keep = {id(p) for p in trainable}
        for key in [key for key in self.masters if key not in keep]:
            del self.masters[key]  # the inactive block's master goes with it
        for key in [key for key in self._hooks if key not in keep]:
            self._hooks.pop(key).remove()
        tensors = [self._opt_tensor(p) for p in trainable]
        if self.fp32_grad_accum:  # a hook needs requires_grad, so only trainable params get one
            for p in trainable:
                if id(p) in self.masters and id(p) not in self._hooks:
                    self._hooks[id(p)] = p.register_post_accumulate_grad_hook(self._accumulate)
        n_persistent = len(self.layout.persistent)
        old, self.optimizer = self.optimizer, None
        self.optimizer = make_optimizer(self.spec, [tensors[:n_persistent],
                                                    tensors[n_persistent:]])
        if old is not None:
            # Everything trainable before and after keeps its moments and step count: the
            # persistent params, and blocks drawn again (their masters were kept above too).
            for t in tensors:
                if t in old.state:
                    self.optimizer.state[t] = old.state[t]
        del old  # the state of blocks that went inactive is freed here

    def prepare_grads(self) -> list[torch.Tensor]:
        """Move low-precision grads onto the fp32 masters (where the hook has not already);
        return the tensors to be stepped."""
        out = []
        for p in self.trainable():
            t = self._opt_tensor(p)
            if t is not p and p.grad is not None:  # not accumulated by the hook: cast it now
                t.grad = p.grad.to(torch.float32) if t.grad is None else t.grad.add_(p.grad)
                p.grad = None
            out.append(t)
        return out

    def step(self, lr: float) -> None:
        """Optimizer step at ``lr``, write masters back into the weights, zero all grads."""
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for key, master in self.masters.items():
                self.params[key].copy_(master)
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.trainable():  # low-precision grads, if prepare_grads was skipped
            p.grad = None

    def state_bytes(self) -> int:
        """Bytes of optimizer state plus fp32 masters on this rank."""
        state = [v for s in self.optimizer.state.values() for v in s.values()]
        return tensor_bytes(state + list(self.masters.values()))

    def state_dict(self) -> dict:
        """Deep copy of the active set, optimizer state and masters, keyed by parameter name."""
        by_tensor = {self._opt_tensor(p): self.names[id(p)] for p in self.trainable()}
        return {
            "active": None if self.active is None else list(self.active),
            "optimizer": {by_tensor[t]: copy.deepcopy(s) for t, s in self.optimizer.state.items()},
            "masters": {self.names[key]: m.detach().clone() for key, m in self.masters.items()},
        }

    def load_state_dict(self, state: dict, params: dict[str, nn.Parameter]) -> None:
        """Restore what ``state_dict`` returned (call after the model weights are loaded)."""
        for key in ("active", "optimizer", "masters"):
            if key not in state:
                raise KeyError(f"optimizer state dict is missing the field {key!r}")
        self.masters.clear()
        self.set_active(state["active"], force=True)
        with torch.no_grad():
            for name, value in state["masters"].items():
                self.masters[id(params[name])].copy_(value)
        for name, value in state["optimizer"].items():
            t = self._opt_tensor(params[name])
            self.optimizer.state[t] = copy.deepcopy(value)


# ---------------------------------------------------------------------------- checkpoint state
def engine_state(module: nn.Module, opt: LisaOptimizer) -> dict:
    """Copy of the weights and buffers plus the LISA optimizer's state (the torch engine).

    Under FSDP2 the values are the local DTensor shards, keyed by name.
    """
    model = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"model": model, **opt.state_dict()}


def load_engine_state(module: nn.Module, opt: LisaOptimizer, params: dict, state: dict) -> None:
    """Inverse of :func:`engine_state` (bitwise); ``params`` maps names to parameters."""
    if "model" not in state:
        raise KeyError("engine state dict is missing the field 'model'")
    module.load_state_dict(state["model"])
    opt.load_state_dict(state, params)

