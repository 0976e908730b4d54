"""DeepSpeed release gate and the workarounds the ZeRO engine (llm/engines/deepspeed_zero.py)
needs, each in one function, listed with the test that guards it in docs/engines.md ("DeepSpeed
workarounds").

Nothing happens at import (this module does not even import DeepSpeed): each workaround is applied
where an engine is built or torn down, and only on the DeepSpeed releases they were checked on
(``SUPPORTED_DEEPSPEED``); ``deepspeed_module()`` refuses any other release with a
``RuntimeError`` naming the supported range.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import os
import re
import socket

import torch
from torch import nn

# [lowest, first unsupported): where every workaround below was checked (0.19.4 and 0.19.8 pass
# tests/llm/test_engine_deepspeed.py). 0.19.4 is the first with ``managed_gradient_accumulation``
# (several backward() calls per step); 0.16.9, 0.18.9 and 0.19.3 fail that file.
SUPPORTED_DEEPSPEED = ((0, 19, 4), (0, 20, 0))


def _release(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def check_deepspeed_version(version: str | None = None) -> str:
    """Refuse a DeepSpeed release outside ``SUPPORTED_DEEPSPEED`` (default: the installed one).

    Returns:
        The version string.

    Raises:
        RuntimeError: naming the version found and the supported range.
    """
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    lo, hi = SUPPORTED_DEEPSPEED
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", str(version))
    if m is None or not lo <= tuple(int(g) for g in m.groups()) < hi:
        spec = f"deepspeed>={_release(lo)},<{_release(hi)}"
        raise RuntimeError(
            f"deepspeed {version} is not supported by scalebio's DeepSpeed engine: it works around "
            f"DeepSpeed internals that are checked on {spec} only (docs/engines.md, \"DeepSpeed "
            f"workarounds\"). Install a supported release (pip install '{spec}') or use "
            "engine.kind fsdp2. To support a new release, run tests/llm/test_engine_deepspeed.py "
            "against it and widen SUPPORTED_DEEPSPEED in llm/engines/deepspeed_compat.py."
        )
    return version


def deepspeed_module():
    """The ``deepspeed`` module, imported on first use and version-checked."""
    import deepspeed

    check_deepspeed_version(deepspeed.__version__)
    return deepspeed


def changed(what: str) -> RuntimeError:
    import deepspeed

    return RuntimeError(f"deepspeed {deepspeed.__version__}: {what} is gone or changed; the "
                        "workaround in llm/engines/deepspeed_compat.py that uses it needs updating "
                        "(docs/engines.md, \"DeepSpeed workarounds\")")


@contextlib.contextmanager
def frozen_gc():
    """Within the block, the cyclic garbage collector skips every object alive at its start.

    A LISA switch frees the old DeepSpeed engine with ``gc.collect()`` (it sits in reference
    cycles), which otherwise scans every Python object of the process (measured on a tiny ZeRO-3
    model: 1.5–1.8 s per switch outside the block, 0.3–0.5 s inside). The objects alive at entry
    (modules, models) are long-lived anyway; a cycle among them that dies inside the block is
    only collected after it. Process-wide while it lasts, so opt-in and scoped: ``gc.unfreeze()``
    on exit. A no-op if something else has already frozen objects (``gc.get_freeze_count() > 0``):
    the block then leaves that freeze alone.
    """
    if gc.get_freeze_count() > 0:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------- DeepSpeed workarounds
# Applied at engine build/teardown only; docs/engines.md lists each with its guarding test.
@contextlib.contextmanager
def _shm_op_skipped():
    """On the CPU accelerator, DeepSpeed's comm backend JIT-builds a shared-memory all-reduce op
    when it is created (~30 s, needs a C++ toolchain); gloo does the same collectives. Replace the
    builder for that moment only: the module attribute is restored on exit."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        yield
        return
    comm_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not torch
    original = getattr(comm_torch, "build_shm_op", None)
    if original is None:
        raise changed("deepspeed.comm.torch.build_shm_op")
    comm_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        comm_torch.build_shm_op = original


def init_deepspeed_distributed(dist_backend: str | None = None) -> None:
    """Start DeepSpeed's process group (once): a launcher's env:// or an existing torch group,
    else a 1-rank group on a free local port (setting ``LOCAL_RANK=0`` if unset, which
    ``deepspeed.initialize`` requires; also for an existing 1-rank torch group started by hand).
    On CPU the shm comm op is not built."""
    deepspeed = deepspeed_module()
    if deepspeed.comm.is_initialized():
        return
    dist = torch.distributed
    if dist.is_initialized() and dist.get_world_size() == 1:
        os.environ.setdefault("LOCAL_RANK", "0")
    with _shm_op_skipped():
        if "RANK" in os.environ or dist.is_initialized():
            deepspeed.init_distributed(dist_backend=dist_backend)
            return
        with socket.socket() as s:  # a plain process: DeepSpeed needs a group, so make one of 1
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it is set
        deepspeed.init_distributed(dist_backend=dist_backend,
                                   init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                   auto_mpi_discovery=False)


def prologue_once_per_backward(ds) -> None:
    """Run the engine's backward prologue once per autograd graph task (ids increase).

    Each ``ds(...)`` forward hooks its outputs to call it, and each call enters ZeRO's backward
    context: two forwards in one backward (w on train + validation) entered it twice, and the
    post-backward reduction was skipped (``KeyError: 0`` in ``averaged_gradients`` at step).
    Patched on this engine instance only."""
    prologue = getattr(ds, "_backward_prologue", None)
    if prologue is None or inspect.signature(prologue).parameters:
        raise changed("DeepSpeedEngine._backward_prologue(self)")
    last_task = [None]

    def once() -> None:
        task = torch._C._current_graph_task_id()
        if task != -1 and task == last_task[0]:
            return
        last_task[0] = task
        prologue()

    ds._backward_prologue = once


def release_engine(ds, model: nn.Module, local) -> None:
    """Destroy a DeepSpeed engine so that nothing keeps it alive. ``destroy()`` leaves the
    module's forward hooks (their closures hold the whole engine), ZeRO-3's ``param._z3_optimizer``
    back-references, and params that were trainable still view the old flat buffers (cloned)."""
    ds.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(ds, name, None)
        if handle is not None:
            handle.remove()
            setattr(ds, name, None)
    with torch.no_grad():
        for p in model.parameters():
            if hasattr(p, "_z3_optimizer"):
                p._z3_optimizer = None
            if p.requires_grad:
                t = local(p)
                t.data = t.data.clone()


def flat_groups(ds, zero_stage: int) -> list[tuple[int, torch.Tensor]]:
    """(param group id, fp32 flat master partition) of a DeepSpeed engine, in optimizer order:
    where ZeRO keeps the masters whose state a LISA switch carries over (no public API)."""
    zo = ds.optimizer
    try:
        if zero_stage == 3:  # ZeRO-3 may split a param group into several sub-groups
            return [(zo.sub_group_to_group_id[i], f)
                    for i, f in enumerate(zo.fp32_partitioned_groups_flat)]
        return list(enumerate(zo.single_partition_of_fp32_groups))
    except AttributeError:
        raise changed(f"the ZeRO-{zero_stage} optimizer's fp32 flat partitions") from None
