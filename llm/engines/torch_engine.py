"""The plain-torch engine, one class for ``engine.kind`` single, ddp and fsdp2.

All three keep one model and a ``LisaOptimizer`` (optimizer state and fp32 masters only for the
trainable tensors), clip the same way and checkpoint the same state. What differs is small:

* wrapping (the builders): ``ddp`` broadcasts rank 0's initial weights, as DDP does; ``fsdp2``
  casts to bf16 if asked and ``fully_shard`` s every decoder block and then the root (embeddings,
  final norm, head), so the weights, masters and optimizer state become sharded DTensors. Given a
  deferred model (meta parameters, llm/engines/materialize.py), ``fsdp2`` shards it first and then
  loads each rank's slices, so no rank ever holds the full weights;
* gradient reduction: ``ddp`` all-reduces in ``step``; ``fsdp2`` reduce-scatters in backward;
  ``single`` has nothing to reduce;
* ``full_model_state_dict``: ``fsdp2`` gathers the shards to rank 0.

Why no ``DistributedDataParallel`` wrapper (ddp). DDP builds its gradient reducer once, over the
params that have ``requires_grad`` at construction; LISA flips ``requires_grad`` every ``period``
steps, so DDP would have to be re-wrapped at each switch (or run ``find_unused_parameters``, an
extra graph traversal per backward). The ScaleBiO loop also calls ``backward`` once per
micro-batch through two models (u and w) and θ; DDP would all-reduce after every micro-batch
unless every model is put under ``no_sync``. Instead ``step`` all-reduces the accumulated grads of
the *trainable* tensors once, in one flat buffer per dtype: one collective per step, correct for
any number of forwards/backwards, and inactive blocks cost nothing.

FSDP2. A LISA switch is ``requires_grad_`` on the sharded params (FSDP2 re-reads it at every
unshard; inactive blocks get no gradient and no reduce-scatter) plus a new optimizer over the new
set (milliseconds, no re-wrapping), so optimizer bytes scale with the LISA active share
(docs/engines.md). No ``MixedPrecisionPolicy``: FSDP2 fixes its mixed-precision dtypes at lazy init
from the params trainable at that moment, so a block frozen then and activated later would fail;
with bf16 weights and fp32 masters there is nothing for the policy to do. Gradients are
reduce-scattered once per backward, so they accumulate correctly over micro-batches. Checkpoints:
``state_dict()`` holds the *local* shards keyed by parameter name; save and load it with
``torch.distributed.checkpoint`` to reshard to another world size.

Gradients are **averaged** over ranks (as DDP and FSDP2 do): a loss normalised by *global* counts
must be multiplied by the world size to get the gradient of the global-batch objective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from scalebio.llm.engines.engine import (
    LisaOptimizer,
    OptimizerSpec,
    clip_grad_norm,
    engine_state,
    load_engine_state,
)
from scalebio.llm.engines.lisa import LisaConfig, find_decoder_blocks, lisa_layout
from scalebio.llm.engines.materialize import load_fsdp2, source_of

KINDS = ("single", "ddp", "fsdp2")


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


def _require_process_group(who: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{who} needs torch.distributed initialised")


class TorchEngine:
    """One model + its LISA-aware optimizer (module doc); build it with ``build_single_engine``
    or ``build_fsdp2_engine``.

    Args:
        model: the (already broadcast or sharded) model.
        opt: optimizer hyperparameters.
        lisa: LISA settings, or ``None`` (every parameter trains).
        kind: ``"single"``, ``"ddp"`` or ``"fsdp2"``.
        blocks_path: dotted path of the decoder blocks, found before ``fully_shard`` changed the
            module classes (fsdp2); ``None``: found here.
        fp32_grad_accum: accumulate bf16 params' micro-batch gradients in fp32
            (``LisaOptimizer``).
    """

    def __init__(self, model: nn.Module, opt: OptimizerSpec, lisa: LisaConfig | None,
                 kind: str = "single", blocks_path: str | None = None,
                 fp32_grad_accum: bool = True):
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        self.module, self.kind = model, kind
        if lisa is not None and not lisa.enabled:
            lisa = None
        # Under fsdp2 the parameters are the DTensor ones fully_shard made: layout after sharding.
        self.layout = lisa_layout(model, lisa, blocks_path)
        self._params = dict(model.named_parameters())
        names = {id(p): n for n, p in self._params.items()}
        self.opt = LisaOptimizer(self.layout, opt, names, active=None if lisa is None else [],
                                 fp32_grad_accum=fp32_grad_accum)

    def set_active_blocks(self, active: list[int] | None) -> None:
        """LISA switch (a no-op if the set is unchanged); ``None`` = every block trainable."""
        self.opt.set_active(active)

    def step(self, lr: float, clip: float | None) -> float:
        """Average grads over ranks (ddp), clip the global grad norm, step at ``lr``, zero grads;
        return the pre-clip norm."""
        tensors = self.opt.prepare_grads()
        if self.kind == "ddp":  # fsdp2 grads were reduce-scattered in backward already
            _all_reduce_mean(tensors)
        norm = clip_grad_norm(tensors, clip)
        self.opt.step(lr)
        return norm

    # Checkpoints go through torch.distributed.checkpoint (llm/loop/checkpoint.py), which
    # reshards: any of single, ddp and fsdp2, at any world size, loads what another one saved.
    checkpoint_format = "dcp"

    def state_dict(self) -> dict:
        """Copy of weights, buffers, active blocks, optimizer state and masters (by name; the
        local shards under fsdp2, so that DCP saves each once)."""
        return engine_state(self.module, self.opt)

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (bitwise), or a :meth:`checkpoint_template`
        filled from a checkpoint of any torch engine kind and world size."""
        load_engine_state(self.module, self.opt, self._params, state)

    def checkpoint_template(self, plain: dict, saved: dict[str, tuple]) -> dict:
        """Uninitialised tensors laid out like :meth:`state_dict` (local shards under fsdp2) for
        a checkpoint whose non-tensor entries are ``plain`` (the active blocks) and whose tensor
        entries are ``saved`` (``{"optimizer/<param>/<key>": (shape, dtype), ...}``): what
        ``torch.distributed.checkpoint.load`` fills in place. Switches to the saved active
        blocks first, since the optimizer holds state (and masters) only for them."""
        self.opt.set_active(plain.get("active"), force=True)
        optimizer: dict[str, dict] = {}
        for key, (shape, dtype) in saved.items():
            group, _, rest = key.partition("/")
            param, _, field = rest.rpartition("/")
            if group != "optimizer" or param not in self._params:
                continue  # not optimizer state, or not a parameter here: the caller names it
            t = self.opt._opt_tensor(self._params[param])
            # moments are laid out like their tensor (sharded under fsdp2); Adam's step count
            # is a 0-d CPU tensor
            optimizer.setdefault(param, {})[field] = (
                torch.empty_like(t, dtype=dtype) if len(shape) and shape == tuple(t.shape)
                else torch.empty(shape, dtype=dtype))
        return {"model": {k: torch.empty_like(v) for k, v in self.module.state_dict().items()},
                "active": self.opt.active, "optimizer": optimizer,
                "masters": {self.opt.names[key]: torch.empty_like(m)
                            for key, m in self.opt.masters.items()}}

    def full_model_state_dict(self) -> dict:
        """Full weights on CPU: on every rank, or (fsdp2, a collective) on rank 0 only."""
        if self.kind == "fsdp2":
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.module, options=options)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    def optimizer_state_bytes(self) -> int:
        """Bytes of this rank's optimizer state plus fp32 masters."""
        return self.opt.state_bytes()


def build_single_engine(
    model: nn.Module, opt: OptimizerSpec, lisa: LisaConfig | None, ddp: bool = False,
    fp32_grad_accum: bool = True,
) -> TorchEngine:
    """One process (``ddp=False``) or data parallel over the default process group.

    Args:
        model: an HF causal LM (any decoder family), already on its device and dtype. Non-fp32
            weights get fp32 masters while trainable.
        opt: optimizer hyperparameters.
        lisa: LISA settings; with LISA only persistent params train until the first
            ``set_active_blocks``. ``None``: every parameter trains.
        ddp: data parallel over the initialised default process group (grads averaged, weights
            broadcast from rank 0 here).
        fp32_grad_accum: accumulate bf16 params' micro-batch gradients in fp32.
    """
    if source_of(model) is not None:
        raise ValueError("build_single_engine: the model is deferred (parameters on the meta "
                         "device): single and ddp keep a full copy per rank, build it with "
                         "ModelSource.load() (load_run_model does for these engine kinds)")
    if ddp:
        _require_process_group("build_single_engine(ddp=True)")
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
    return TorchEngine(model, opt, lisa, "ddp" if ddp else "single",
                       fp32_grad_accum=fp32_grad_accum)


def build_fsdp2_engine(
    model: nn.Module,
    opt: OptimizerSpec,
    lisa: LisaConfig | None,
    mesh: DeviceMesh | None = None,
    bf16: bool = False,
    reshard_after_forward: bool = True,
    fp32_grad_accum: bool = True,
) -> TorchEngine:
    """Shard ``model`` with FSDP2 (one unit per decoder block, plus the root) and wrap it.

    Args:
        model: an HF causal LM, identical on every rank (FSDP2 shards from each rank's copy), or
            a deferred one (``materialize.deferred_model``: sharded on the meta device, then each
            rank loads its slices, rank 0 reading the source).
        opt: optimizer hyperparameters.
        lisa: LISA settings, as for :func:`build_single_engine`.
        mesh: 1-D device mesh; default: every rank of the default group, on CUDA if available.
        bf16: cast the weights to bf16 before sharding (fp32 masters for trainable params).
        reshard_after_forward: FSDP2's option (True = ZeRO-3-like, False = ZeRO-2-like).
        fp32_grad_accum: accumulate bf16 params' micro-batch gradients in fp32.
    """
    _require_process_group("build_fsdp2_engine")
    if mesh is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    deferred = source_of(model)
    if mesh.device_type == "cuda" and deferred is None:
        model.to(torch.device("cuda", torch.cuda.current_device()))
    if bf16:  # parameters only: buffers such as RoPE's inv_freq keep their fp32 precision
        for p in model.parameters():  # (free on a deferred model's meta parameters)
            p.data = p.data.to(torch.bfloat16)
    path, blocks = find_decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if deferred is not None:
        load_fsdp2(model, deferred, mesh)
    return TorchEngine(model, opt, lisa, "fsdp2", path, fp32_grad_accum=fp32_grad_accum)
