"""Fixtures for the LLM tests. DeepSpeed ones are opt-in (not autouse): only tests that ask for
``deepspeed_dist`` pay for importing DeepSpeed and starting a 1-rank gloo process group."""

from __future__ import annotations

import os

import pytest

# Before torch starts its thread pool (2 cores shared with other jobs: a 2-rank ZeRO-3 run was
# 6x slower oversubscribed; docs/engines.md, "CPU and launchers"). Subprocess launches inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def deepspeed_dist():
    """World-size-1 DeepSpeed process group on gloo, started once per session, the way a plain
    process gets one (no RANK/MASTER_* variables: a free local port)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # only silences the accelerator warning
    import torch

    # DeepSpeed's ZeRO-3 init patches Tensor.__new__; a first import of torch._dynamo inside
    # that patch fails with a signature mismatch, so import it before.
    import torch._dynamo  # noqa: F401

    deepspeed = pytest.importorskip("deepspeed")
    from scalebio.llm.engines.deepspeed_zero import init_deepspeed_distributed

    torch.set_num_threads(1)
    init_deepspeed_distributed("gloo")  # on CPU, skips the ~30 s JIT build of the shm comm op
    yield deepspeed


@pytest.fixture(scope="module")
def one_rank_group():
    """A 1-rank gloo process group for in-process FSDP2/engine tests (reused if a test already
    made one; destroyed at the end of the module only if this fixture made it)."""
    import tempfile

    import torch.distributed as dist  # imported here: OMP_NUM_THREADS is set above, before torch

    created = False
    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="scalebio_pg_", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        created = True
    assert dist.get_world_size() == 1
    yield
    if created:
        dist.destroy_process_group()
