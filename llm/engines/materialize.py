"""Sharded construction: no rank materialises a full model copy it does not own.

A *deferred* model (:func:`deferred_model`) is the model's module tree with every parameter on the
meta device (no memory) and its buffers real (computed at construction, as usual: RoPE's
``inv_freq`` and the like), plus the :class:`ModelSource` it comes from. Copying it is free, so
the loop's two copies u and w are two deferred models; each engine then shards its copy and loads
the weights into the shards:

* FSDP2 (:func:`load_fsdp2`): ``fully_shard`` on the meta model, ``to_empty`` on the device
  (the buffers are put back), then rank 0 reads the weights one tensor at a time — from the
  folder's safetensors without memory-mapping (llm/engines/safetensors_stream.py), or from the
  model built in full on rank 0 (a model from a config, initialised exactly as
  :func:`scalebio.llm.model.load_model` does, so the initial weights are those of an unsharded
  run) — and broadcasts it; each rank keeps its slice. Peak host memory: one tensor on every rank,
  plus the full model on rank 0 when it is built from a config (or when a checkpoint's keys do not
  match the module names).
* DeepSpeed ZeRO-3 (:func:`zero3_model`): transformers builds the model under
  ``HfDeepSpeedConfig`` (alive only while it is built), so every parameter is partitioned at
  construction; a folder is loaded by transformers (rank 0 reads it), a config model gets rank 0's
  full initial weights one gathered parameter at a time.

u and w load the same source twice, so they start identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from scalebio.llm.engines.safetensors_stream import (
    SafetensorsFolder,
    StateDictWeights,
    has_safetensors,
)

SOURCE_ATTR = "scalebio_source"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: the arguments of
    :func:`scalebio.llm.model.load_model`."""

    path: str | None = None
    config: dict | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    seed: int = 0
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False

    def load(self) -> nn.Module:
        """The full model on the CPU, as an unsharded run builds it."""
        from scalebio.llm.model import load_model

        return load_model(**dataclasses.asdict(self))


def deferred_model(source: ModelSource) -> nn.Module:
    """The model of ``source`` with meta parameters and real buffers (module doc).

    Raises:
        FileNotFoundError / ValueError: as :func:`scalebio.llm.model.load_model`.
    """
    from scalebio.llm.model import load_model

    with _parameters_on_meta():
        model = (load_model(**dataclasses.asdict(source)) if source.path is None
                 else _folder_skeleton(source))
    setattr(model, SOURCE_ATTR, source)
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """While it lasts, every parameter a module registers is moved to the meta device; buffers
    are left alone. A parameter is registered before its module initialises it, so the random
    init then runs on meta tensors: free. An already-meta parameter is registered as is, which
    keeps tied weights (the head assigned the embedding's parameter) one object."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            meta = type(param)(param.data.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _folder_skeleton(source: ModelSource) -> nn.Module:
    # The folder's architecture only (config.json): its weights are read when it is sharded.
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from scalebio.llm.model import enable_gradient_checkpointing, resolve_dtype

    folder = Path(source.path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model path {source.path!r} is not a folder with a config.json")
    hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                           trust_remote_code=source.trust_remote_code)
    extra = ({} if source.attn_implementation is None
             else {"attn_implementation": source.attn_implementation})
    model = AutoModelForCausalLM.from_config(hf_config, dtype=resolve_dtype(source.dtype),
                                             trust_remote_code=source.trust_remote_code, **extra)
    if source.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def source_of(model: nn.Module) -> ModelSource | None:
    """The source of a deferred model; ``None`` for a model that holds its weights."""
    source = getattr(model, SOURCE_ATTR, None)
    if source is None or not any(p.is_meta for p in model.parameters()):
        return None
    return source


# ------------------------------------------------------------------------------ rank 0's plan
def _aliases(model: nn.Module) -> list[tuple[str, nn.Parameter, list[str]]]:
    """Each distinct parameter with all its names (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [(name, p, names[id(p)]) for name, p in model.named_parameters()]


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


def _plan(weights, targets: list[tuple[list[str], tuple, bool]]) -> list[str | None]:
    """The source key of each target (aliases, global shape, required); raises ``KeyError`` /
    ``ValueError`` naming the file and key when a required one is missing or mis-shaped."""
    keys, plan = weights.keys(), []
    for aliases, shape, required in targets:
        key = next((a for a in aliases if a in keys), None)
        if key is None and required:
            raise KeyError(f"no weights for parameter {aliases[0]!r} in {weights.what}")
        if key is not None and tuple(weights.shape(key)) != tuple(shape):
            raise ValueError(f"{weights.where(key)}: {key!r} has shape "
                             f"{tuple(weights.shape(key))}, the model expects {tuple(shape)}")
        plan.append(key)
    return plan


def _open_and_plan(source: ModelSource, targets):
    """Rank 0: the weights (safetensors read in place if every parameter is there under its
    module name, else the model built in full) and the plan over ``targets``."""
    if source.path is not None and has_safetensors(source.path):
        files = SafetensorsFolder(source.path)
        try:
            return files, _plan(files, targets)
        except KeyError:  # e.g. a family that renames or fuses weights when transformers loads it
            files.close()
    weights = StateDictWeights(source.load().state_dict(),
                               source.path or "the model built from model.config")
    return weights, _plan(weights, targets)


def _agree_on_plan(source: ModelSource, targets, group=None):
    """Rank 0 opens the weights and plans; every rank gets the plan (or rank 0's error)."""
    weights, plan, error = None, None, None
    if dist.get_rank() == 0:
        try:
            weights, plan = _open_and_plan(source, targets)
        except (KeyError, ValueError, OSError) as err:
            error = err
    msg = [plan, None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(msg, src=0, group=group)
    if error is not None:
        raise error
    if msg[1] is not None:
        raise RuntimeError(f"rank 0 could not load the model weights: {msg[1]}")
    return weights, msg[0]


# ------------------------------------------------------------------------------ FSDP2
def load_fsdp2(model: nn.Module, source: ModelSource, mesh) -> None:
    """Give the meta parameters of a ``fully_shard`` ed deferred model their memory on the mesh's
    device, restore its buffers there, and load each parameter's slice (module doc)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    device = torch.device(mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    model.to_empty(device=device)  # new (uninitialised) storage for parameters and buffers
    for module, name, buf in buffers:  # the buffers computed at construction
        module._buffers[name] = buf.to(device)
    params = _aliases(model)
    tensors = [p for _, p, _ in params] + [b for _, b in _persistent_buffers(model)]
    targets = [(aliases, tuple(p.shape), True) for _, p, aliases in params]
    targets += [([name], tuple(b.shape), False) for name, b in _persistent_buffers(model)]
    group = mesh.get_group()
    weights, plan = _agree_on_plan(source, targets, group)
    with torch.no_grad():
        for t, key in zip(tensors, plan):
            if key is None:  # a buffer the checkpoint does not hold: keep the constructed value
                continue
            if weights is not None:
                full = weights.get(key).to(device=device, dtype=t.dtype).contiguous()
            else:
                full = torch.empty(t.shape, dtype=t.dtype, device=device)
            if full.numel():  # bytes, so that any dtype goes through any backend
                dist.broadcast(full.view(-1).view(torch.uint8), src=0, group=group)
            if isinstance(t, DTensor):  # keep this rank's slice (no communication)
                shard = distribute_tensor(full, mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(shard.to_local())
            else:
                t.copy_(full)
            del full
    if weights is not None:
        weights.close()
    delattr(model, SOURCE_ATTR)


# ------------------------------------------------------------------------------ ZeRO-3
def zero3_model(source: ModelSource, ds_config: dict) -> nn.Module:
    """The model of ``source`` with every parameter ZeRO-3 partitioned at construction (module
    doc); DeepSpeed's process group must be up."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # transformers keeps only a weak reference to it: it must stay alive while the model is
    # built, and no longer (while alive, every HF model built in the process is partitioned).
    hf_config = HfDeepSpeedConfig(ds_config)
    try:
        model = source.load()
    finally:
        unset_hf_deepspeed_config()
        del hf_config
    if source.path is not None:
        return model  # loaded by transformers, partitioned
    # transformers initialised the partitions its own way: put the unsharded run's weights there
    params = _aliases(model)
    targets = [(aliases, tuple(getattr(p, "ds_shape", p.shape)), True)
               for _, p, aliases in params]
    weights, plan = _agree_on_plan(source, targets)
    rank0 = dist.get_rank() == 0
    with torch.no_grad():
        for (_, p, _), key in zip(params, plan):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank0:  # broadcast to the other ranks and re-partitioned on exit
                    p.data.copy_(weights.get(key).to(p.dtype))
    if weights is not None:
        weights.close()
    return model
