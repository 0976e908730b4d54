"""scalebio plan: the shipped configs plan at their world size, and predicted peaks match measured.

Measured peak: real `scalebio reweight` runs (the CLI's engines and step), 3 steps, the allocator's
own count of live tensor bytes (PyTorch's CPU allocator totals, reported to ``torch.profiler``
with every allocation; ``FLAGS_caffe2_report_cpu_memory_usage`` makes the total count frees in
every thread, as gloo frees communication buffers in its own), maximised over step 1 (after step
0 made the Adam state; step 2 only marks the end), less what was live before the run. Multi-rank
runs: this file under ``torchrun``, the three shapes one after the other in one process group.
ZeRO-3 rows leave out DeepSpeed's two reduce buckets (a constant 2 × 5e8 elements that would hide
any error in the rest).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scalebio.llm.config_files import load_config
from scalebio.llm.plan import plan_run
from scalebio.llm.plan_memory import ZERO_BUCKET, GiB, MicroBatch, predict

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "llm" / "configs").glob("*.yaml"))
TOL = 0.15  # the plan's promise: within 15 % of the measured peak
PLAN_SECONDS = 30  # planning is meant for start-up: seconds, not minutes
SEQ = 64  # every example is cut to SEQ tokens (long answers), so micro-batches are unpadded
SHAPES = {  # small Llamas; vocabularies above the char tokenizer's ids so the logits weigh in
    "h64-l3-v512": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "h128-l4-v2048": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=2048),
    "h96-l6-v4096": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, vocab_size=4096),
    # bf16 weights, as on GPUs: fp32 RMSNorm inputs and loss, fp32 masters (engine.bf16 on)
    "h128-l4-v2048-bf16": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=2048),
    # deep and narrow with a small vocabulary, so the blocks' activations dominate the peak: the
    # same shape with and without model.gradient_checkpointing checks that part of the plan
    "h128-l8-v512": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
    "h128-l8-v512-gc": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
}


# ---------------------------------------------------------------- measuring a real run
def _count_all_threads() -> None:
    lib = next((Path(torch.__file__).parent / "lib").glob("libc10.so*"))
    ctypes.c_bool.in_dll(ctypes.CDLL(str(lib)), "FLAGS_caffe2_report_cpu_memory_usage").value = True


def measure_runs(pairs: list[tuple[str, str]], result: str) -> None:
    """Run ``scalebio reweight --config C --out O`` for each pair; write each peak (bytes) to
    ``result.<rank>`` as JSON."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from scalebio.llm.cli import reweight_main
    from scalebio.llm.data import batching

    _count_all_threads()
    draw = batching.StepSampler.batch

    def marked(self, step):  # every step starts with its batch: a zero-length marker
        with record_function(f"scalebio-step-{step}"):
            pass
        return draw(self, step)

    batching.StepSampler.batch = marked
    peaks = []
    for config, out in pairs:
        gc.collect()  # the previous run's garbage, or its late collection would lower this peak
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            assert reweight_main(["--config", config, "--out", out, "--no-progress"]) == 0
        marks, totals, stack = [], [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if isinstance(node.extra_fields, torch._C._profiler._ExtraFields_Allocation):
                f = node.extra_fields
                totals.append((node.start_time_ns, f.total_allocated, f.alloc_size))
            elif node.name.startswith("scalebio-step-"):
                marks.append(node.start_time_ns)
            stack.extend(node.children)
        marks.sort()
        totals.sort()
        # what earlier runs of this process left (DeepSpeed's gc.freeze keeps their engines)
        before = totals[0][1] - totals[0][2]
        peaks.append(max(total for t, total, _ in totals if marks[1] <= t < marks[-1]) - before)
    Path(f"{result}.{os.environ.get('RANK', '0')}").write_text(json.dumps(peaks))


def _write_data(folder: Path) -> dict:
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghij klmnopqrstuvwxyz"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("a", "b", "c", "val"):
        rows = [{"instruction": "x", "input": "", "output": "".join(rng.choice(letters, 4 * SEQ))}
                for _ in range(8)]
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _config(tmp: Path, data: dict, shape: str, kind: str, world: int) -> Path:
    raw = {
        "model": {"config": {"model_type": "llama", "max_position_embeddings": 2 * SEQ,
                             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                             **SHAPES[shape]}, "tokenizer": "char",
                  "dtype": "bfloat16" if shape.endswith("bf16") else "float32",
                  "gradient_checkpointing": shape.endswith("-gc")},
        # 12 sequences per step, one micro-batch per rank (the same split with either vocabulary)
        "data": {"sources": [{"name": n, "path": str(data[n])} for n in "abc"],
                 "validation": [{"path": str(data["val"])}], "max_length": SEQ,
                 "per_source": 4, "val_batch": 12, "micro_batch_size": 12 // world,
                 "cache_dir": str(tmp / "cache")},
        "bilevel": {"steps": 3},
        # a switch inside the window; embeddings trained (LISA's paper policy) so every block is
        # on the backward path whichever is drawn: with them frozen (the default) the blocks
        # below the lowest drawn one save nothing, and the plan's figure is the worst case
        # (block 0 drawn), which a 3-step run need not reach
        "lisa": {"enabled": True, "n_active": 1, "period": 2, "train_embeddings": True,
                 "train_head": True},
        "engine": {"kind": "deepspeed" if kind == "zero3" else kind, "zero_stage": 3,
                   "bf16": shape.endswith("bf16")},
        "run": {"checkpoint_every": 0, "tracker": "none", "threads": 1},
    }
    path = tmp / f"{kind}-{shape}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _supervised(cfg) -> int:
    """Supervised targets per example: every example is cut to SEQ, so all have the same."""
    from scalebio.llm.data.sources import load_sources
    from scalebio.llm.data.tokenizer import load_tokenizer

    d = cfg.data
    data = load_sources(d.source_specs(), d.validation_specs(), load_tokenizer("char"),
                        d.max_length, d.cache_dir)
    targets = {n for t in data.train for n in t["n_target"]} | set(data.val["n_target"])
    assert len(targets) == 1 and {len(x) for x in data.train[0]["input_ids"]} == {SEQ}
    return targets.pop()


def _compare(tmp: Path, kind: str, world: int) -> list[dict]:
    data = _write_data(tmp / "data")
    # ZeRO-3 refuses gradient checkpointing (the config check), so it has no "-gc" shape
    configs = [_config(tmp, data, shape, kind, world) for shape in SHAPES
               if not (kind == "zero3" and shape.endswith("-gc"))]
    pairs = [(str(c), str(tmp / f"out-{c.stem}")) for c in configs]
    result = tmp / "peaks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    script = [__file__, str(result), *[x for pair in pairs for x in pair]]
    cmd = ([sys.executable, *script] if world == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
            "--master_port", str(_free_port()), *script])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = []
    for i, config in enumerate(configs):
        cfg, _ = load_config(config)
        plan = plan_run(cfg, world, cuda=False)
        sh, sup = plan.shape, _supervised(cfg)
        exact = predict(plan.arch, plan.inventory, plan.placement,
                        MicroBatch(sh.micro_batch_size, SEQ, pad=False, supervised=sup),
                        MicroBatch(sh.val_micro_batch_size, SEQ, pad=False, supervised=sup),
                        len(cfg.data.sources))
        for rank in range(world):
            measured = json.loads(Path(f"{result}.{rank}").read_text())[i]
            # DeepSpeed's reduce buckets (2 × 5e8 elements) are a constant; compare the rest
            fixed = 2 * ZERO_BUCKET * plan.placement.comm_bytes if kind == "zero3" else 0
            rows.append({"engine": kind, "shape": config.stem.split("-", 1)[1], "rank": rank,
                         "measured": measured - fixed, "predicted": exact.peak - fixed,
                         "worst_case": plan.peak - fixed})
    print("\n" + "\n".join(f"{r['engine']:<6} {r['shape']:<14} rank {r['rank']}  measured "
                           f"{r['measured'] / 2**20:8.2f} MiB  predicted "
                           f"{r['predicted'] / 2**20:8.2f} MiB  ratio "
                           f"{r['predicted'] / r['measured']:.3f}  worst case "
                           f"{r['worst_case'] / 2**20:8.2f} MiB" for r in rows))
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(rows: list[dict]) -> None:
    for r in rows:
        assert abs(r["predicted"] / r["measured"] - 1) <= TOL, r
        # the plan itself assumes padded micro-batches and every position supervised: an upper
        # bound of the exact prediction
        assert r["worst_case"] >= r["predicted"], r


def test_single_process_peaks_match_the_plan(tmp_path):
    _check(_compare(tmp_path, "single", 1))


@pytest.mark.slow
def test_fsdp2_two_rank_peaks_match_the_plan(tmp_path):
    _check(_compare(tmp_path, "fsdp2", 2))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_two_rank_peaks_match_the_plan(tmp_path):
    _check(_compare(tmp_path, "zero3", 2))


# ---------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_plans_at_its_world_size(path):
    from scalebio.llm.plan import build_plan_sampler, format_plan

    cfg, _ = load_config(path)
    t0 = time.perf_counter()
    plan = plan_run(cfg)  # at data.world_size
    assert time.perf_counter() - t0 < PLAN_SECONDS
    world = cfg.data.world_size or 1
    sampler, _ = build_plan_sampler(cfg, world, rank=world - 1)  # the last rank's share
    sources, _, val = sampler.draw(0)
    mine = sampler._mine(sources)
    assert len(mine) == plan.shape.accumulation
    assert sum(len(c) for c in mine) * world == plan.shape.train_batch
    assert sum(len(c) for c in sampler._mine(val)) * world == plan.shape.val_batch
    assert plan.fits, format_plan(plan)  # every shipped config fits 80 GiB GPUs


def _plan(name: str, *overrides: str):
    cfg, _ = load_config(ROOT / "llm" / "configs" / name, list(overrides))
    return plan_run(cfg)


def test_32b_fits_eight_80gib_gpus_with_lisa_and_not_without():
    assert _plan("qwen25_32b_lisa_8gpu.yaml").fits
    full = _plan("qwen25_32b_lisa_8gpu.yaml", "--lisa.enabled", "false")
    assert not full.fits and full.peak > 80 * GiB


def test_bundled_architectures_have_the_published_parameter_counts():
    # closed form: 2·V·h (untied embeddings and head) + h (final norm) + L · (attention
    # h·q + 2·h·kv + q·h [+ q + 2·kv biases] + MLP 3·h·i + two norms 2·h)
    def count(v, h, i, layers, heads, kv_heads, bias):
        q, kv = h, kv_heads * h // heads
        attn = 2 * h * q + 2 * h * kv + (q + 2 * kv if bias else 0)
        return 2 * v * h + h + layers * (attn + 3 * h * i + 2 * h)

    llama = _plan("llama3_8b_lisa_8gpu.yaml")
    qwen = _plan("qwen25_32b_lisa_8gpu.yaml")
    assert llama.inventory.total == count(128256, 4096, 14336, 32, 32, 8, False) == 8_030_261_248
    assert qwen.inventory.total == count(152064, 5120, 27648, 64, 40, 8, True) == 32_763_876_352


@pytest.mark.parametrize("fp32_grads, grad_bytes", [("true", 4), ("false", 2)])
def test_one_gpu_8b_with_lisas_default_policy_shows_the_embedding_and_head_state(fp32_grads,
                                                                                 grad_bytes):
    plan = _plan("llama3_8b_lisa_1gpu.yaml", "--lisa.n_active", "4",
                 "--lisa.train_embeddings", "true", "--lisa.train_head", "true",
                 "--engine.fp32_grad_accum", fp32_grads)
    emb_head, block = 2 * 128256 * 4096, 218_112_000  # per copy; one block's parameters
    trainable = emb_head + 4 * block + 4096  # + the final norm
    assert plan.inventory.trainable == trainable
    # 2 B weights of both copies; 4 B master + 8 B moments + the gradient per trainable parameter
    before_activations = 2 * 2 * plan.inventory.total + 2 * (12 + grad_bytes) * trainable
    names = ("weights (u + w)", "fp32 masters (u + w)", "Adam moments (u + w)",
             "gradients (u + w)")
    got = sum(r.bytes for r in plan.prediction.rows if r.name in names and r.phase != "step")
    assert got == before_activations
    # the README's 14 B per trainable parameter: ≈ 86 GB; fp32 accumulation adds 2 B: ≈ 94 GB
    assert (85e9 < got < 87e9) if grad_bytes == 2 else (93e9 < got < 95e9)
    assert not plan.fits


def test_plan_cli_exit_status(capsys):
    from scalebio.cli import main

    config = str(ROOT / "llm" / "configs" / "llama3_8b_lisa_1gpu.yaml")
    assert main(["plan", "--config", config]) == 0
    assert "fits:" in capsys.readouterr().out
    assert main(["plan", "--config", config, "--lisa.train_embeddings", "true"]) == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "does not fit" in captured.err
    assert main(["plan", "--config", config, "--gpus", "2"]) == 2  # engine single, 2 ranks
    assert "engine.kind: 'single'" in capsys.readouterr().err


def test_reweight_refuses_a_run_that_does_not_fit_before_reading_data(tmp_path, monkeypatch):
    # A simulated 24 GiB CUDA device (this machine has none): reweight must stop at the plan,
    # before tokenising data or loading weights; --no-plan-check goes on to the data.
    from types import SimpleNamespace

    from scalebio.llm.config import ConfigError
    from scalebio.llm.loop import reweight as loop
    from scalebio.llm.loop import setup

    class DataReached(Exception):
        pass

    def no_data(*args, **kwargs):
        raise DataReached

    monkeypatch.setattr(setup, "start_run",
                        lambda *a, **k: (0, 1, torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=24 * GiB))
    monkeypatch.setattr(setup, "load_data", no_data)
    cfg, _ = load_config(ROOT / "llm" / "configs" / "llama3_8b_lisa_1gpu.yaml")
    with pytest.raises(ConfigError, match="does not fit this GPU"):
        loop.reweight(cfg, tmp_path / "run")
    with pytest.raises(DataReached):
        loop.reweight(cfg, tmp_path / "run", plan_check=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=141 * GiB))  # an H200
    with pytest.raises(DataReached):
        loop.reweight(cfg, tmp_path / "run")


if __name__ == "__main__":  # the measuring side: RESULT CONFIG OUT [CONFIG OUT ...]
    args = sys.argv[2:]
    measure_runs(list(zip(args[::2], args[1::2])), sys.argv[1])
