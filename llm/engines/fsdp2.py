"""FSDP2 engine (``torch.distributed.fsdp.fully_shard``): the path for large models.

Every decoder block is its own FSDP2 unit, the root holds embeddings, final norm and head. Weights
are sharded DTensors, in bf16 with ``bf16=True``; the optimizer state and an fp32 master exist
only for the active blocks and the persistent params (``LisaOptimizer``), so optimizer bytes
scale with the LISA active share (docs: lisa-sharding.md). A LISA switch is ``requires_grad_`` on
the sharded params (FSDP2 re-reads it at every unshard; inactive blocks get no gradient and no
reduce-scatter) plus a new optimizer over the new set (milliseconds, no re-wrapping).

No ``MixedPrecisionPolicy``: FSDP2 fixes its mixed-precision dtypes at lazy init from the params
trainable at that moment, so a block frozen then and activated later would fail. With bf16 weights
and fp32 masters there is nothing for the policy to do. Gradients are reduce-scattered and
averaged over ranks in backward (FSDP2's default), once per backward: grads accumulate correctly
over micro-batches.

Checkpoints: ``state_dict()`` returns *sharded* DTensors (weights, masters, optimizer state) keyed
by parameter name. Save and load it with ``torch.distributed.checkpoint`` (``dcp.save`` /
``dcp.load``), which can reshard to another world size. ``full_model_state_dict()`` gathers full
weights on rank 0.
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


class Fsdp2Engine:
    """One ``fully_shard`` ed model + its LISA-aware optimizer over local shards (module doc)."""

    def __init__(self, model: nn.Module, opt: OptimizerSpec, lisa: LisaConfig | None,
                 blocks_path: str):
        self.module = model
        # fully_shard replaced the parameters with DTensor ones: take the layout afterwards.
        self.layout = lisa_layout(model, lisa, blocks_path)
        self._params = dict(model.named_parameters())
        names = {id(p): n for n, p in self._params.items()}
        self.opt = LisaOptimizer(self.layout, opt, names, active=None if lisa is None else [])

    def set_active_blocks(self, active: list[int] | None) -> None:
        """LISA switch (a no-op if the set is unchanged); ``None`` = every block trainable."""
        self.opt.set_active(active)

    def step(self, lr: float, clip: float | None) -> float:
        """Clip the global (all-rank) grad norm, step at ``lr``, zero grads; return that norm."""
        tensors = self.opt.prepare_grads()
        norm = clip_grad_norm(tensors, clip)
        self.opt.step(lr)
        return norm

    def state_dict(self) -> dict:
        """Sharded copy: weights, active blocks, optimizer state, masters (DTensors by name)."""
        return engine_state(self.module, self.opt)

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (same world size, or resharded by ``dcp.load``)."""
        load_engine_state(self.module, self.opt, self._params, state)

    def full_model_state_dict(self) -> dict:
        """Full weights gathered to CPU on rank 0 (empty dict elsewhere); call on every rank."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.module, options=options)

    def optimizer_state_bytes(self) -> int:
        """Bytes of this rank's shards of optimizer state plus fp32 masters."""
        return self.opt.state_bytes()


def build_fsdp2_engine(
    model: nn.Module,
    opt: OptimizerSpec,
    lisa: LisaConfig | None,
    mesh: DeviceMesh | None = None,
    bf16: bool = False,
    reshard_after_forward: bool = True,
) -> Fsdp2Engine:
    """Shard ``model`` with FSDP2 (one unit per decoder block, plus the root) and wrap it.

    Args:
        model: an HF causal LM, identical on every rank (FSDP2 shards from each rank's copy).
        opt: optimizer hyperparameters.
        lisa: LISA config; with LISA only persistent params train until the first
            ``set_active_blocks``. ``None``: every parameter trains.
        mesh: 1-D device mesh; default: every rank of the default group, on CUDA if available.
        bf16: cast the weights to bf16 before sharding (fp32 masters for trainable params).
        reshard_after_forward: FSDP2's option (True = ZeRO-3-like, False = ZeRO-2-like).

    Returns:
        The engine.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("build_fsdp2_engine needs torch.distributed initialised")
    if mesh is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    if mesh.device_type == "cuda":
        model.to(torch.device("cuda", torch.cuda.current_device()))
    if bf16:  # parameters only: buffers such as RoPE's inv_freq keep their fp32 precision
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    path, blocks = find_decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return Fsdp2Engine(model, opt, lisa, path)
