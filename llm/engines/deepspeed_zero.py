"""DeepSpeed ZeRO-2/3 engine (optional CPU optimizer offload) with LISA by rebuild-per-switch.

Under ZeRO, toggling ``requires_grad`` is silently wrong and lr=0 groups keep the full state, so
every LISA switch destroys the DeepSpeed engine and rebuilds it over ``persistent + active``
blocks (docs/lisa-sharding.md §A(1)). Param group 0 (persistent params: same flat layout in every
engine) keeps its fp32 master and optimizer state; the inactive blocks' are freed. Teardown closes
three leaks: the forward hooks ``destroy()`` leaves, params still viewing the old flat buffers
(cloned), and ZeRO-3's ``param._z3_optimizer``.

Caller contract: read ``engine.module`` (the *current* DeepSpeed engine) for every forward, and drop
every output/loss before ``set_active_blocks`` (else the old engine stays alive: ResourceWarning).
A re-activated block restarts its moments from zero and, in bf16, its master from the bf16 weights
(the ``LisaOptimizer`` policy). Accumulation is caller-owned: any number of ``backward()`` calls,
then ``step()``. Data-parallel grads are averaged over ranks, as in DDP/FSDP.
"""

from __future__ import annotations

import copy
import gc
import os
import socket
import sys
import warnings
import weakref

import deepspeed
import deepspeed.comm.torch  # noqa: F401  (so sys.modules has it for the shm patch)
import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from scalebio.llm.engines.engine import OptimizerSpec, tensor_bytes
from scalebio.llm.engines.lisa import LisaConfig, apply_active_blocks, check_active, lisa_layout

FORMAT = "scalebio-deepspeed-v1"
_RESERVED_ZERO_KEYS = ("stage", "offload_optimizer")
_GC_FROZEN = [False]  # gc.get_freeze_count() is O(frozen objects): remember instead


def skip_cpu_shm_op() -> None:
    """On the CPU accelerator, skip DeepSpeed's shared-memory comm op (a ~30 s JIT build at the
    first ``init_distributed``; gloo does the same collectives). ``sys.modules``, because
    ``import deepspeed.comm.torch as m`` would bind the *torch* package."""
    if get_accelerator().device_name() == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def deepspeed_config(
    zero_stage: int, offload: bool, bf16: bool, zero_config: dict | None = None
) -> dict:
    """The DeepSpeed config dict of every (re)build. Batch fields are placeholders (the loop owns
    batching); clipping is off (DeepSpeed's default is 1.0): ``ZeroEngine.step`` sets it.

    Raises:
        ValueError: bad ``zero_stage``, or ``zero_config`` sets ``stage``/``offload_optimizer``.
    """
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage!r}")
    extra = dict(zero_config or {})
    clash = [k for k in _RESERVED_ZERO_KEYS if k in extra]
    if clash:
        raise ValueError(f"zero_config must not set {clash}: use zero_stage / offload instead")
    zero = {"stage": zero_stage, **extra}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # step() is the boundary, backward() accumulates
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,  # client torch SGD
        "zero_force_ds_cpu_optimizer": False,  # client SGD under offload
        "steps_per_print": sys.maxsize,
        "wall_clock_breakdown": False,
    }


def _init_distributed() -> None:
    if deepspeed.comm.is_initialized():
        return
    skip_cpu_shm_op()
    if "RANK" in os.environ or torch.distributed.is_initialized():
        deepspeed.init_distributed()  # a launcher's env:// (or wraps an existing group)
        return
    with socket.socket() as s:  # a plain process: DeepSpeed needs a group, so make one of 1
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deepspeed.init_distributed(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                               auto_mpi_discovery=False)


def _client_optimizer(spec: OptimizerSpec, groups: list[list[nn.Parameter]], offload: bool):
    param_groups = [{"params": g} for g in groups]
    if spec.name == "adamw" and offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds cpu_adam on first use

        return DeepSpeedCPUAdam(param_groups, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                weight_decay=spec.weight_decay, adamw_mode=True)
    if spec.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                 weight_decay=spec.weight_decay)
    return torch.optim.SGD(param_groups, lr=spec.lr, weight_decay=spec.weight_decay)


def _flat_groups(ds, zero_stage: int) -> list[tuple[int, torch.Tensor]]:
    """(param group id, fp32 flat master partition) of a DeepSpeed engine, in optimizer order."""
    zo = ds.optimizer
    if zero_stage == 3:  # ZeRO-3 may split a param group into several sub-groups
        return [(zo.sub_group_to_group_id[i], f)
                for i, f in enumerate(zo.fp32_partitioned_groups_flat)]
    return list(enumerate(zo.single_partition_of_fp32_groups))


def _prologue_once_per_backward(ds) -> None:
    """Run the engine's backward prologue once per autograd graph task (ids increase).

    Each ``ds(...)`` forward hooks its outputs to call it, and each call enters ZeRO's backward
    context: two forwards in one backward (w on train + validation) entered it twice, and the
    post-backward reduction was skipped (``KeyError: 0`` in ``averaged_gradients`` at step)."""
    prologue, last_task = ds._backward_prologue, [None]

    def once() -> None:
        task = torch._C._current_graph_task_id()
        if task != -1 and task == last_task[0]:
            return
        last_task[0] = task
        prologue()

    ds._backward_prologue = once


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: shape {tuple(src.shape)} does not match the engine's "
                         f"{tuple(dst.shape)} (another model, stage or world size?)")
    dst.copy_(src)


def _clone_state(state: dict) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
            for k, v in state.items()}


class ZeroEngine:
    """One model under DeepSpeed ZeRO-2/3 with LISA; satisfies the ``Engine`` protocol.

    Build it with ``build_deepspeed_engine``. The DeepSpeed engine is created lazily (first
    ``module``/``step``/``set_active_blocks``), so a LISA run never allocates full state.
    """

    def __init__(self, model: nn.Module, spec: OptimizerSpec, lisa: LisaConfig | None,
                 zero_stage: int, offload: bool, bf16: bool, zero_config: dict | None,
                 freeze_gc: bool):
        self.model, self.spec, self.zero_stage = model, spec, zero_stage
        self.offload, self.freeze_gc = offload, freeze_gc
        self.config = deepspeed_config(zero_stage, offload, bf16, zero_config)
        self.layout = lisa_layout(model, lisa)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.active: list[int] | None = None  # None = every block trainable
        self._ds = None

    # ------------------------------------------------------------------------ Engine protocol
    @property
    def module(self) -> nn.Module:
        """The current DeepSpeed engine (call it for forwards; re-read after every switch)."""
        return self._engine()

    def set_active_blocks(self, active: list[int] | None) -> None:
        """LISA switch: rebuild over ``persistent + active`` blocks (no-op if unchanged)."""
        active = check_active(active, len(self.layout.blocks))
        if self._ds is not None and active == self.active:
            return
        carried = self._teardown() if self._ds is not None else []
        self.active = active
        self._build(carried)

    def step(self, lr: float, clip: float | None) -> float:
        """Clip (ZeRO's own clipping, coefficient ``min(1, clip / (‖g‖ + 1e-6))``), step at
        ``lr``, zero grads.

        Returns:
            The pre-clip global grad norm over the trainable params.
        """
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if clip is not None and not clip > 0.0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        ds = self._engine()
        for group in ds.optimizer.param_groups:
            group["lr"] = lr
        ds.optimizer.clip_grad = 0.0 if clip is None else float(clip)
        ds.step()
        return float(ds.get_global_grad_norm())

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state + fp32 master partitions held by this rank."""
        if self._ds is None:
            return 0
        inner = self._ds.optimizer.optimizer
        state = [v for s in inner.state.values() for v in s.values()]
        return tensor_bytes(state + [flat for _, flat in _flat_groups(self._ds, self.zero_stage)])

    def state_dict(self) -> dict:
        """This rank's shard: weights (full under ZeRO-2, the local partition under ZeRO-3),
        fp32 master partitions and optimizer state, and the active blocks.

        Save one file per rank; ``load_state_dict`` needs the same world size and stage.
        """
        ds = self._engine()
        inner = ds.optimizer.optimizer
        return {
            "format": FORMAT,
            "zero_stage": self.zero_stage,
            "world_size": deepspeed.comm.get_world_size(),
            "active": None if self.active is None else list(self.active),
            "params": {self.names[id(p)]: self._local(p).detach().clone()
                       for p in self.model.parameters()},
            "groups": [{"group": g, "master": flat.detach().clone(),
                        "state": _clone_state(inner.state.get(flat, {}))}
                       for g, flat in _flat_groups(ds, self.zero_stage)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (rebuilds over the saved active blocks).

        Raises:
            ValueError / KeyError: another format, stage, world size, or model.
        """
        for key in ("format", "zero_stage", "world_size", "active", "params", "groups"):
            if key not in state:
                raise KeyError(f"DeepSpeed engine state dict is missing the field {key!r}")
        world = (deepspeed.comm.get_world_size() if deepspeed.comm.is_initialized()
                 else int(os.environ.get("WORLD_SIZE", "1")))  # what init_distributed will use
        for key, want in (("format", FORMAT), ("zero_stage", self.zero_stage),
                          ("world_size", world)):
            if state[key] != want:
                raise ValueError(f"state dict field {key!r} is {state[key]!r}, expected {want!r}")
        active = check_active(state["active"], len(self.layout.blocks))
        if self._ds is not None and active != self.active:
            self._teardown()
        self.active = active
        ds = self._engine()
        if self.zero_stage == 3:
            ds.optimizer.checkpoint_event_prologue()  # partition everything before writing
        with torch.no_grad():
            for p in self.model.parameters():
                name = self.names[id(p)]
                if name not in state["params"]:
                    raise KeyError(f"state dict has no weights for parameter {name!r}")
                _copy_checked(self._local(p), state["params"][name], f"params[{name!r}]")
        self._restore_groups(state["groups"], _flat_groups(ds, self.zero_stage), clone=True)
        if self.zero_stage == 3:
            ds.optimizer.checkpoint_event_epilogue()  # re-gather persistent (small) params

    def full_model_state_dict(self) -> dict:
        """Full weights keyed like ``model.state_dict()`` on rank 0 (``{}`` on other ranks).

        Collective under ZeRO-3: every rank must call it.
        """
        self._engine()
        rank0 = deepspeed.comm.get_rank() == 0
        out = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            partitioned = hasattr(value, "ds_id")
            with deepspeed.zero.GatheredParameters([value], enabled=partitioned):
                if rank0:
                    out[name] = value.detach().clone()
        return out

    # ------------------------------------------------------------------------ internals
    def _engine(self):
        if self._ds is None:
            self._build([])
        return self._ds

    def _local(self, p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.zero_stage == 3 else p

    def _groups(self) -> list[list[nn.Parameter]]:
        blocks = range(len(self.layout.blocks)) if self.active is None else self.active
        active = [p for i in blocks for p in self.layout.blocks[i]]
        return [g for g in (list(self.layout.persistent), active) if g]

    def _build(self, carried: list[dict]) -> None:
        _init_distributed()
        if self.freeze_gc and not _GC_FROZEN[0]:
            # The gc.collect() at every switch then scans only objects made since (here
            # 0.8 s -> 0.05 s); what is alive now (modules, models) is long-lived anyway.
            gc.collect()
            gc.freeze()
            _GC_FROZEN[0] = True
        apply_active_blocks(self.layout, self.active)
        optimizer = _client_optimizer(self.spec, self._groups(), self.offload)
        self._ds, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                            config=self.config)
        _prologue_once_per_backward(self._ds)
        if carried:
            flats = _flat_groups(self._ds, self.zero_stage)
            self._restore_groups(carried, [(g, f) for g, f in flats if g == 0], clone=False)

    def _restore_groups(self, saved: list[dict], flats: list[tuple[int, torch.Tensor]],
                        clone: bool) -> None:
        if len(saved) != len(flats):
            raise ValueError(f"state has {len(saved)} optimizer groups, engine has {len(flats)}")
        inner = self._ds.optimizer.optimizer
        with torch.no_grad():
            for i, (entry, (group, flat)) in enumerate(zip(saved, flats)):
                if entry["group"] != group:
                    raise ValueError(f"groups[{i}] is param group {entry['group']}, "
                                     f"expected {group}")
                _copy_checked(flat, entry["master"], f"groups[{i}].master")
                inner.state.pop(flat, None)
                if entry["state"]:
                    inner.state[flat] = _clone_state(entry["state"]) if clone else entry["state"]

    def _teardown(self) -> list[dict]:
        """Destroy the current engine, return param group 0's master + state to carry."""
        ds, self._ds = self._ds, None
        inner = ds.optimizer.optimizer
        # No copies: the old master and moments are only read into the new engine (lower peak).
        carried = [{"group": g, "master": f.detach(), "state": dict(inner.state.get(f, {}))}
                   for g, f in _flat_groups(ds, self.zero_stage)
                   if g == 0 and self.layout.persistent]  # group 0 = persistent iff any
        old_optimizer = weakref.ref(ds.optimizer)
        ds.destroy()
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(ds, name, None)  # destroy() leaves these: they hold the whole engine
            if handle is not None:
                handle.remove()
                setattr(ds, name, None)
        with torch.no_grad():
            for p in self.model.parameters():
                if hasattr(p, "_z3_optimizer"):
                    p._z3_optimizer = None
                if p.requires_grad:  # still a view into the old engine's flat buffer
                    local = self._local(p)
                    local.data = local.data.clone()
        del ds, inner
        gc.collect()
        if old_optimizer() is not None:
            warnings.warn("the previous DeepSpeed engine is still referenced after a LISA switch "
                          "(a loss/output tensor or engine.module kept from before the switch?); "
                          "its optimizer state stays in memory", ResourceWarning, stacklevel=3)
        return carried


def build_deepspeed_engine(
    model: nn.Module,
    opt: OptimizerSpec,
    lisa: LisaConfig | None,
    zero_stage: int,
    offload: bool = False,
    bf16: bool = False,
    zero_config: dict | None = None,
    freeze_gc: bool = True,
) -> ZeroEngine:
    """Wrap ``model`` in a DeepSpeed ZeRO engine with LISA support (module doc).

    Args:
        model: an HF causal LM (plain, or already ZeRO-3 partitioned via ``HfDeepSpeedConfig``).
        opt: optimizer hyperparameters (a client torch optimizer: no JIT op build, except
            ``DeepSpeedCPUAdam`` for AdamW with ``offload``).
        lisa: LISA policy for params outside the blocks; ``None`` = everything trainable.
        zero_stage: 2 or 3.
        offload: ``offload_optimizer`` to CPU (fp32 masters and moments in host memory).
        bf16: bf16 weights with fp32 masters (DeepSpeed casts the model).
        zero_config: extra ``zero_optimization`` fields (bucket sizes, persistence threshold).
        freeze_gc: ``gc.freeze()`` once before the first build, so that the ``gc.collect()``
            that frees the old engine at each switch is fast (it is process-wide).

    Returns:
        The engine; the DeepSpeed engine itself is built on first use.
    """
    return ZeroEngine(model, opt, lisa, zero_stage, offload, bf16, zero_config, freeze_gc)
