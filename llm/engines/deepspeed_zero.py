"""DeepSpeed ZeRO-2/3 engine (optional CPU optimizer offload) with LISA by rebuild-per-switch.

Under ZeRO, toggling ``requires_grad`` is silently wrong and lr=0 groups keep the full state, so
every LISA switch destroys the DeepSpeed engine and rebuilds it over ``persistent + active``
blocks (docs/engines.md, "DeepSpeed ZeRO-2/3"). Each rebuild has one param group for the
persistent params and one per active block; a group's flat layout depends on its params only, so
the fp32 master partitions and optimizer state of every group present before and after a switch
(the persistent params, and each block drawn again) are carried into the new engine, and the
inactive blocks' are freed: the ``LisaOptimizer`` policy (a block re-activated after an absence
restarts its moments from zero and, in bf16, its master from the bf16 weights).

The DeepSpeed internals the engine leans on, and the release gate, live in
llm/engines/deepspeed_compat.py (docs/engines.md, "DeepSpeed workarounds").

Caller contract: read ``engine.module`` (the *current* DeepSpeed engine) for every forward, and drop
every output/loss before ``set_active_blocks`` (else the old engine stays alive: ResourceWarning).
Accumulation is caller-owned: any number of ``backward()`` calls, then ``step()``; with bf16
weights the micro-batch gradients are summed in fp32 unless ``fp32_grad_accum=False``.
Data-parallel grads are averaged over ranks, as in DDP/FSDP. A LISA switch ends in a full
``gc.collect()`` (the old engine sits in reference cycles); wrap the training loop in
``frozen_gc()`` to make that collection cheap. Given a deferred model (meta parameters,
llm/engines/materialize.py), ZeRO-3 builds it partitioned, so no rank holds the full weights.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import warnings
import weakref

import torch
from torch import nn

from scalebio.llm.engines.deepspeed_compat import (  # noqa: F401 (re-exported)
    SUPPORTED_DEEPSPEED,
    changed,
    check_deepspeed_version,
    deepspeed_module,
    flat_groups,
    frozen_gc,
    init_deepspeed_distributed,
    prologue_once_per_backward,
    release_engine,
)
from scalebio.llm.engines.engine import OptimizerSpec, make_optimizer, tensor_bytes
from scalebio.llm.engines.lisa import LisaConfig, apply_active_blocks, check_active, lisa_layout
from scalebio.llm.engines.materialize import source_of, zero3_model

# v2: one param group per active block (v1 had all active blocks in one group)
FORMAT = "scalebio-deepspeed-v2"
_RESERVED_ZERO_KEYS = ("stage", "offload_optimizer")
PERSISTENT = "persistent"  # group key of the persistent params; a block's key is its index
ALL_BLOCKS = "blocks"  # group key of every block at once (no LISA: never switched)


def deepspeed_config(
    zero_stage: int, offload: bool, bf16: bool, zero_config: dict | None = None,
    fp32_grad_accum: bool = True,
) -> dict:
    """The DeepSpeed config dict of every (re)build. Batch fields are placeholders (the loop owns
    batching); clipping is off here (DeepSpeed's default is 1.0) and set by ``ZeroEngine.step``.
    With ``bf16`` and ``fp32_grad_accum``, ZeRO sums the micro-batch gradients in fp32
    (``data_types.grad_accum_dtype``; DeepSpeed's default is the weights' dtype).

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
    config = {
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
    if bf16 and fp32_grad_accum:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def _client_optimizer(spec: OptimizerSpec, groups: list[list[nn.Parameter]], offload: bool):
    if spec.name == "adamw" and offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds cpu_adam on first use

        return DeepSpeedCPUAdam([{"params": g} for g in groups], lr=spec.lr, betas=spec.betas,
                                eps=spec.eps, weight_decay=spec.weight_decay, adamw_mode=True)
    return make_optimizer(spec, groups)


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
                 fp32_grad_accum: bool = True):
        self._dsm = deepspeed_module()  # refuses an unsupported release before any work
        self.config = deepspeed_config(zero_stage, offload, bf16, zero_config, fp32_grad_accum)
        source = source_of(model)
        if source is not None:  # deferred: partitioned at construction (ZeRO-3), else built whole
            if zero_stage == 3:
                init_deepspeed_distributed()
                model = zero3_model(source, self.config)
            else:  # ZeRO-2 keeps a full copy of the weights on every rank anyway
                model = source.load()
        self.model, self.spec, self.zero_stage, self.offload = model, spec, zero_stage, offload
        self.layout = lisa_layout(model, lisa)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.active: list[int] | None = None  # None = every block trainable
        self._keys: list = []  # the group key of each param group of the current engine
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
        keep = set(self._group_keys(active))
        carried = self._teardown(keep) if self._ds is not None else {}
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
        if not hasattr(ds.optimizer, "clip_grad"):  # the config's gradient_clipping, per step
            raise changed("the ZeRO optimizer's clip_grad")
        ds.optimizer.clip_grad = 0.0 if clip is None else float(clip)
        ds.step()
        return float(ds.get_global_grad_norm())

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state + fp32 master partitions held by this rank."""
        if self._ds is None:
            return 0
        inner = self._ds.optimizer.optimizer
        state = [v for s in inner.state.values() for v in s.values()]
        return tensor_bytes(state + [flat for _, flat in flat_groups(self._ds, self.zero_stage)])

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
            "world_size": self._dsm.comm.get_world_size(),
            "active": None if self.active is None else list(self.active),
            "params": {self.names[id(p)]: self._local(p).detach().clone()
                       for p in self.model.parameters()},
            "groups": [{"group": g, "master": flat.detach().clone(),
                        "state": _clone_state(inner.state.get(flat, {}))}
                       for g, flat in flat_groups(ds, self.zero_stage)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (rebuilds over the saved active blocks).

        Raises:
            ValueError / KeyError: another format, stage, world size, or model.
        """
        for key in ("format", "zero_stage", "world_size", "active", "params", "groups"):
            if key not in state:
                raise KeyError(f"DeepSpeed engine state dict is missing the field {key!r}")
        comm = self._dsm.comm
        world = (comm.get_world_size() if comm.is_initialized()
                 else int(os.environ.get("WORLD_SIZE", "1")))  # what init_distributed will use
        for key, want in (("format", FORMAT), ("zero_stage", self.zero_stage),
                          ("world_size", world)):
            if state[key] != want:
                raise ValueError(f"state dict field {key!r} is {state[key]!r}, expected {want!r}")
        active = check_active(state["active"], len(self.layout.blocks))
        if self._ds is not None and active != self.active:
            self._teardown(set())
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
        self._restore_groups(state["groups"], flat_groups(ds, self.zero_stage), clone=True)
        if self.zero_stage == 3:
            ds.optimizer.checkpoint_event_epilogue()  # re-gather persistent (small) params

    def full_model_state_dict(self) -> dict:
        """Full weights keyed like ``model.state_dict()`` on rank 0 (``{}`` on other ranks).

        Collective under ZeRO-3: every rank must call it.
        """
        self._engine()
        rank0 = self._dsm.comm.get_rank() == 0
        out = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            partitioned = hasattr(value, "ds_id")
            with self._dsm.zero.GatheredParameters([value], enabled=partitioned):
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

    def _group_keys(self, active: list[int] | None) -> list:
        """The key of each non-empty param group of an engine over ``active``, in order."""
        keys = [PERSISTENT] if self.layout.persistent else []
        return keys + ([ALL_BLOCKS] if active is None else list(active))

    def _groups(self) -> list[list[nn.Parameter]]:
        blocks = self.layout.blocks
        by_key = {PERSISTENT: list(self.layout.persistent),
                  ALL_BLOCKS: [p for ps in blocks for p in ps]}
        return [by_key[k] if k in by_key else list(blocks[k]) for k in self._keys]

    def _build(self, carried: dict) -> None:
        init_deepspeed_distributed()
        apply_active_blocks(self.layout, self.active)
        self._keys = self._group_keys(self.active)
        optimizer = _client_optimizer(self.spec, self._groups(), self.offload)
        self._ds, *_ = self._dsm.initialize(model=self.model, optimizer=optimizer,
                                            config=self.config)
        prologue_once_per_backward(self._ds)
        if carried:  # every group present before and after the switch: same flat layout
            flats = [(g, f) for g, f in flat_groups(self._ds, self.zero_stage)
                     if self._keys[g] in carried]
            saved = [entry for key in self._keys if key in carried for entry in carried[key]]
            self._restore_groups(saved, flats, clone=False)

    def _restore_groups(self, saved: list[dict], flats: list[tuple[int, torch.Tensor]],
                        clone: bool) -> None:
        if len(saved) != len(flats):
            raise ValueError(f"state has {len(saved)} optimizer groups, engine has {len(flats)}")
        inner = self._ds.optimizer.optimizer
        with torch.no_grad():
            for i, (entry, (group, flat)) in enumerate(zip(saved, flats)):
                if entry["group"] != group and clone:  # a checkpoint: same engine layout
                    raise ValueError(f"groups[{i}] is param group {entry['group']}, "
                                     f"expected {group}")
                _copy_checked(flat, entry["master"], f"groups[{i}].master")
                inner.state.pop(flat, None)
                if entry["state"]:
                    inner.state[flat] = _clone_state(entry["state"]) if clone else entry["state"]

    def _teardown(self, keep: set) -> dict:
        """Destroy the current engine; return the masters + state of the groups in ``keep``
        (key → its entries, one per ZeRO-3 sub-group), to carry into the next one."""
        ds, self._ds = self._ds, None
        inner = ds.optimizer.optimizer
        carried: dict = {}
        # No copies: the old master and moments are only read into the new engine (lower peak).
        for g, f in flat_groups(ds, self.zero_stage):
            if self._keys[g] in keep:
                carried.setdefault(self._keys[g], []).append(
                    {"group": g, "master": f.detach(), "state": dict(inner.state.get(f, {}))})
        old_optimizer = weakref.ref(ds.optimizer)
        release_engine(ds, self.model, self._local)
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
    fp32_grad_accum: bool = True,
) -> ZeroEngine:
    """Wrap ``model`` in a DeepSpeed ZeRO engine with LISA support (module doc).

    Args:
        model: an HF causal LM (plain, or already ZeRO-3 partitioned via ``HfDeepSpeedConfig``),
            or a deferred one (``materialize.deferred_model``): under ZeRO-3 it is then built
            partitioned, so no rank holds its full weights.
        opt: optimizer hyperparameters (a client torch optimizer: no JIT op build, except
            ``DeepSpeedCPUAdam`` for AdamW with ``offload``).
        lisa: LISA policy for params outside the blocks; ``None`` = everything trainable.
        zero_stage: 2 or 3.
        offload: ``offload_optimizer`` to CPU (fp32 masters and moments in host memory).
        bf16: bf16 weights with fp32 masters (DeepSpeed casts the model).
        zero_config: extra ``zero_optimization`` fields (bucket sizes, persistence threshold).
        fp32_grad_accum: with ``bf16``, sum the micro-batch gradients in fp32.

    Returns:
        The engine; the DeepSpeed engine itself is built on first use.

    Raises:
        RuntimeError: the installed DeepSpeed is outside ``SUPPORTED_DEEPSPEED``.
    """
    return ZeroEngine(model, opt, lisa, zero_stage, offload, bf16, zero_config, fp32_grad_accum)
