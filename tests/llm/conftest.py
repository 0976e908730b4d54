"""Fixtures for the LLM tests. DeepSpeed ones are opt-in (not autouse): only tests that ask for
``deepspeed_dist`` pay for importing DeepSpeed and starting a 1-rank gloo process group."""

from __future__ import annotations

import os
import socket

import pytest

# Before torch starts its thread pool (2 cores shared with other jobs; env.md §2a: 6x slower
# when oversubscribed). Subprocess launches inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT / --master_port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def deepspeed_dist():
    """World-size-1 DeepSpeed process group on gloo, started once per session (env.md §2e)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences the accelerator warning
    import torch
    import torch._dynamo  # noqa: F401  (env.md §2b: import before DeepSpeed patches Tensor.__new__)

    deepspeed = pytest.importorskip("deepspeed")
    from scalebio.llm.engines.deepspeed_zero import skip_cpu_shm_op

    skip_cpu_shm_op()  # no 30 s JIT build of the shm comm op; gloo does the collectives
    torch.set_num_threads(1)
    if not deepspeed.comm.is_initialized():
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        for key, value in env.items():
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
    yield deepspeed
