"""``scalebio plan``: decide before loading any weight whether a run fits its GPUs.

In seconds and without weights: validate the config; build the run's :class:`StepSampler` at the
stated world size (record counts read from the data files when they exist, else assumed, and the
plan says which); build both model copies on the meta device from the architecture
(:mod:`scalebio.llm.plan_arch`); apply the engine's placement and predict each rank's bytes
(:mod:`scalebio.llm.plan_memory`); compare the peak plus allocator headroom with the GPU memory.

Library use (``reweight`` refuses a run that does not fit before loading weights)::

    plan = plan_run(cfg, world_size, gpu_memory)
    if not plan.fits:
        raise ConfigError(format_plan(plan))
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from scalebio.llm.config import Config, ConfigError
from scalebio.llm.plan_arch import Arch, Inventory, inventory, load_architecture, meta_copies
from scalebio.llm.plan_memory import GiB, MicroBatch, Placement, Prediction, predict

# Allocator headroom: the CUDA caching allocator rounds blocks up and fragments (reserved exceeds
# allocated by a few percent in steady training), and the CUDA context, cuBLAS workspaces and
# NCCL buffers live outside the allocator's counters.
HEADROOM_FRACTION = 0.05
HEADROOM_FIXED = 1 * GiB
ASSUMED_RECORDS = 1000  # per source, when a data file is absent: counts only shape the draw
_UNITS = {"": GiB, "gib": GiB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}


def parse_memory(text: str | int | float) -> int:
    """Bytes of ``"80GiB"``, ``"141GB"``, ``"80"`` (GiB) or a number of bytes (int)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--gpu-memory: expected e.g. 80GiB, 141GB or 80 (GiB), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class Plan:
    """Everything ``scalebio plan`` decided; :attr:`fits` is the verdict."""

    world_size: int
    gpu_memory: int
    arch: Arch
    arch_origin: str
    inventory: Inventory
    placement: Placement
    shape: object  # scalebio.llm.data.batching.BatchShape
    data_note: str
    prediction: Prediction
    checkpointed_activations: int  # the activation row of the other checkpointing choice
    engine: str

    @property
    def peak(self) -> int:
        return self.prediction.peak

    @property
    def headroom(self) -> int:
        return int(HEADROOM_FRACTION * self.peak) + HEADROOM_FIXED

    @property
    def fits(self) -> bool:
        return self.peak + self.headroom <= self.gpu_memory


def weight_bytes(cfg: Config) -> int:
    """Bytes per weight as the engine holds them (FSDP2 and DeepSpeed cast with engine.bf16)."""
    if cfg.model.dtype == "bfloat16" or (cfg.engine.bf16 and cfg.engine.kind in ("fsdp2",
                                                                                  "deepspeed")):
        return 2
    return 8 if cfg.model.dtype == "float64" else 4


def _count_records(path: str) -> int:
    from scalebio.llm.data.sources import _read_records

    return sum(1 for _ in _read_records(Path(path)))


class _Rows:
    """A stand-in for a tokenised source: the sampler only needs its length and two columns."""

    def __init__(self, n: int, seq: int, source: list[int] | None = None):
        self.n, self.cols = n, {"n_target": [seq - 1] * n, "source": source or [0] * n}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: str) -> list[int]:
        return self.cols[key]


def build_plan_sampler(cfg: Config, world: int, rank: int = 0):
    """The run's StepSampler at ``world`` ranks over record counts (files read when present).

    Returns (sampler, note): the note says which counts were read and which assumed.
    """
    from types import SimpleNamespace

    from scalebio.llm.data.batching import StepSampler

    d = cfg.data
    counts, notes = [], []
    specs = d.source_specs() + d.validation_specs()
    for spec in specs:
        if Path(spec.path).exists():
            counts.append(_count_records(spec.path))
        else:
            counts.append(ASSUMED_RECORDS)
            notes.append(spec.name)
    k = len(d.source_specs())
    val_src = [i for i, n in enumerate(counts[k:]) for _ in range(n)]
    data = SimpleNamespace(names=tuple(s.name for s in specs[:k]),
                           train=tuple(_Rows(n, d.max_length) for n in counts[:k]),
                           val=_Rows(len(val_src), d.max_length, val_src))
    stratified = d.batch_mode == "stratified"
    try:
        sampler = StepSampler(data, d.batch_mode, val_batch=d.val_batch, seed=cfg.run.seed,
                              pad_token_id=0, rank=rank, world_size=world,
                              per_source=d.per_source if stratified else None,
                              global_batch=None if stratified else d.global_batch,
                              **d.split_args(world))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    read = [f"{s.name} {n}" for s, n in zip(specs, counts) if s.name not in notes]
    note = "records read: " + (", ".join(read) or "none")
    if notes:
        note += f"; absent, assumed {ASSUMED_RECORDS} each: {', '.join(notes)}"
    return sampler, note


def plan_run(cfg: Config, world_size: int | None = None, gpu_memory: int | str = 80 * GiB,
             cuda: bool = True) -> Plan:
    """Plan ``cfg`` on ``world_size`` ranks (default ``data.world_size``, else 1) of
    ``gpu_memory`` bytes each. ``cuda=False`` predicts a CPU run (AdamW steps tensor by tensor).
    Raises ``ConfigError`` for a config that cannot run at that world size."""
    world = world_size or cfg.data.world_size or 1
    if world > 1 and cfg.engine.kind == "single":
        raise ConfigError(f"engine.kind: 'single' runs one process, but {world} ranks were "
                          "asked for; use ddp, fsdp2 or deepspeed")
    shape = cfg.data.batch_shape(world)
    sampler, data_note = build_plan_sampler(cfg, world)
    hf, origin = load_architecture(cfg)
    s = weight_bytes(cfg)
    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[s]
    copy_u, copy_w = meta_copies(hf, dtype)
    inv = inventory(copy_w, cfg)
    if inventory(copy_u, cfg) != inv:  # the copies are identical: a change here is a bug
        raise AssertionError("plan: the two meta copies split differently")
    arch = Arch.from_hf(hf)
    e = cfg.engine
    pl = Placement(kind=e.kind, world=world, zero_stage=e.zero_stage, offload=e.offload,
                   weight_bytes=s, adam=cfg.bilevel.optimizer == "adamw", cuda=cuda,
                   comm_bytes=2 if e.bf16 else 4,
                   fp32_grads=getattr(e, "fp32_grad_accum", True),
                   checkpointing=cfg.model.gradient_checkpointing)
    seq = cfg.data.max_length
    train = MicroBatch(shape.micro_batch_size, seq)
    val = MicroBatch(shape.val_micro_batch_size, seq)
    pred = predict(arch, inv, pl, train, val, len(cfg.data.sources))
    # the activation row of the other checkpointing choice, for the table
    ckpt = predict(arch, inv, dataclasses.replace(pl, checkpointing=not pl.checkpointing),
                   train, val, len(cfg.data.sources)).get("activations")
    del sampler
    return Plan(world, parse_memory(gpu_memory), arch, origin, inv, pl, shape, data_note, pred,
                ckpt, e.kind if e.kind != "deepspeed" else f"deepspeed ZeRO-{e.zero_stage}")


# ---------------------------------------------------------------- report
def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _sampler_note(cfg: Config, world: int) -> str:
    sampler, _ = build_plan_sampler(cfg, world)
    sources, _, val = sampler.draw(0)
    train = [len(c) for c in sampler._mine(sources)]
    vals = [len(c) for c in sampler._mine(val)]
    return (f"rank 0 of {world}: {len(train)} training micro-batches of {max(train)}, "
            f"{len(vals)} validation micro-batches of {max(vals)} (step 0 drawn)")


def format_plan(plan: Plan, cfg: Config | None = None) -> str:
    """The plan as a table (GiB per rank) with its verdict; ``cfg`` adds the sampler's split."""
    a, inv, sh, pl = plan.arch, plan.inventory, plan.shape, plan.placement
    block = inv.block_numel
    persistent = [n for n, on in (("embeddings", inv.embeddings_trained),
                                  ("head", inv.head_trained)) if on]
    lisa = (f"all {len(inv.blocks)} blocks trained" if inv.n_active == len(inv.blocks)
            else f"LISA: {inv.n_active} of {len(inv.blocks)} blocks")
    lines = [
        f"model     {a.model_type} from {plan.arch_origin}: {inv.total / 1e9:.3g} B parameters, "
        f"{len(inv.blocks)} blocks of {block / 1e6:.0f} M, hidden {a.hidden}, vocab {a.vocab}",
        f"engine    {plan.engine} on {plan.world_size} rank(s), "
        f"{'bf16' if pl.weight_bytes == 2 else 'fp32'} weights, "
        f"{'AdamW' if pl.adam else 'SGD'}{', optimizer offloaded' if pl.offload else ''}",
        f"trains    {lisa} + {' + '.join(persistent + ['final norm'])}: "
        f"{inv.trainable / 1e9:.3g} B parameters per copy (u and w)",
        f"batch     {sh.train_batch} = micro-batch {sh.micro_batch_size} × {sh.accumulation} "
        f"accumulation × {sh.world_size} rank(s); validation {sh.val_batch} "
        f"({sh.val_micro_batch_size} per micro-batch)" + ("" if sh.exact else ", uneven chunks"),
        f"data      {plan.data_note}",
    ]
    if cfg is not None:
        lines.append(f"sampler   {_sampler_note(cfg, plan.world_size)}")
    if not a.exact:
        lines.append(f"note      activations of {a.model_type} are estimated with the formula of "
                     "Llama-like blocks")
    lines += ["", f"{'per rank':<34} {'GiB':>8}  note"]
    for phase in ("resident", "backward", "step"):
        lines.append(f"[{phase}]")
        for r in plan.prediction.rows:
            if r.phase == phase:
                lines.append(f"  {r.name:<32} {_gib(r.bytes):>8}  {r.note}")
        if phase == "backward":
            on = pl.checkpointing
            lines.append(f"  {'(without checkpointing)' if on else '(gradient checkpointing)':<32} "
                         f"{_gib(plan.checkpointed_activations):>8}  activations "
                         + ("if model.gradient_checkpointing were off" if on else
                            "with model.gradient_checkpointing: true"))
    p = plan.prediction
    lines += [
        "",
        f"{'peak (' + p.peak_phase + ' phase)':<34} {_gib(plan.peak):>8}  resident + "
        f"max(backward {_gib(p.total('backward'))}, step {_gib(p.total('step'))})",
        f"{'allocator headroom':<34} {_gib(plan.headroom):>8}  "
        f"{HEADROOM_FRACTION:.0%} + {HEADROOM_FIXED / GiB:.0f} GiB (context, communication)",
        f"{'needed':<34} {_gib(plan.peak + plan.headroom):>8}",
        f"{'GPU memory':<34} {_gib(plan.gpu_memory):>8}",
        ("fits" if plan.fits else "DOES NOT FIT") + f": {_gib(plan.peak + plan.headroom)} of "
        f"{_gib(plan.gpu_memory)} GiB per GPU",
    ]
    return "\n".join(lines)


def preflight(cfg: Config, world: int, device: torch.device) -> Plan | None:
    """Refuse, before loading weights, a run whose plan does not fit ``device`` (CUDA only):
    ``ConfigError`` with the plan. Returns the plan (None on CPU)."""
    if device.type != "cuda":
        return None
    plan = plan_run(cfg, world, torch.cuda.get_device_properties(device).total_memory)
    if not plan.fits:
        raise ConfigError(f"the run does not fit this GPU (override: --no-plan-check):\n"
                          f"{format_plan(plan)}")
    return plan
