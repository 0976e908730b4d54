"""Run configuration: the six sections (model, data, bilevel, lisa, engine, run) as small frozen
dataclasses. Reading files and overrides, and typing every value, is in
:mod:`scalebio.llm.config_files`.

Every field is validated in ``__post_init__`` with the user-facing key in the message
(``bilevel.alpha: …``). The file is ~400 lines because every key a user can set, with its default
and its check, is listed here in one place.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from scalebio.llm.data.sources import SourceSpec
from scalebio.llm.engines.lisa import LisaConfig


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


ARCHITECTURES = Path(__file__).resolve().parent / "configs" / "architectures"


def architecture_names() -> list[str]:
    """Names of the bundled model architectures (``model.architecture``)."""
    return sorted(p.stem for p in ARCHITECTURES.glob("*.json"))


@dataclass(frozen=True)
class ModelArgs:
    path: str | None = None  # local folder of an AutoModelForCausalLM (no downloads)
    config: dict | None = None  # or a config dict to build a randomly initialised model
    tokenizer: str | None = None  # "char", a local folder, or None = the model's folder
    dtype: str = "float32"  # float32 | bfloat16 | float16 (θ and its optimizer stay float32)
    trust_remote_code: bool = False
    # recompute each block's activations in backward (non-reentrant): less memory, ~1 more forward
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs flash-attn)
    # a bundled architecture (llm/configs/architectures/<name>.json): what `scalebio plan` builds
    # when model.path has no config.json (e.g. before the weights are downloaded)
    architecture: str | None = None

    def __post_init__(self):
        if self.architecture is not None:
            known = architecture_names()
            _check(self.architecture in known, "model.architecture",
                   f"unknown architecture {self.architecture!r}; bundled: {', '.join(known)}")
            _check(self.path is not None, "model.architecture",
                   "names the architecture of model.path (a model.config needs none)")
        _check(
            (self.path is None) != (self.config is None),
            "model",
            "give exactly one of model.path and model.config",
        )
        _check(
            self.dtype in ("float32", "bfloat16", "float16"),  # what the model loader takes
            "model.dtype",
            f"expected float32, bfloat16 or float16, got {self.dtype!r}",
        )
        _check(
            self.path is not None or self.tokenizer is not None,
            "model.tokenizer",
            "a model built from a config needs a tokenizer ('char' or a local folder)",
        )
        _check(
            isinstance(self.gradient_checkpointing, bool),
            "model.gradient_checkpointing",
            f"expected true or false, got {self.gradient_checkpointing!r}",
        )
        _check(
            self.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
            "model.attn_implementation",
            f"expected sdpa, eager or flash_attention_2, got {self.attn_implementation!r}",
        )
        _check(
            self.attn_implementation != "flash_attention_2"
            or importlib.util.find_spec("flash_attn") is not None,
            "model.attn_implementation",
            "flash_attention_2 needs the flash-attn package, which is not installed "
            "(pip install flash-attn, on a CUDA machine), or use sdpa",
        )


@dataclass(frozen=True)
class DataArgs:
    """Data and the batch of one step.

    Batch vocabulary (``scalebio.llm.data.batching``): the global training batch B (stratified:
    ``per_source`` × K sources; uniform: ``global_batch``) and ``val_batch`` are over all ranks;
    ``micro_batch_size`` is the number of sequences one rank forwards at once; the accumulation
    steps A follow from B = micro_batch_size × A × world size, and each rank forwards
    ``val_batch`` / (A × world size) validation sequences with each training micro-batch. Every
    division must be exact; what can be checked without the world size is checked here, the rest
    by :meth:`batch_shape` (at launch, and by ``scalebio plan``).
    """

    sources: tuple = ()  # [{name, path, format}, ...]
    validation: tuple = ()  # [{path, format}, ...] (name optional)
    max_length: int = 512
    cache_dir: str | None = None  # Arrow caches of tokenised data; default: <out>/cache
    num_proc: int | None = None  # tokenising processes; None: min(4, cores) (checked at load)
    batch_mode: str = "stratified"  # stratified (fixed quota per source) | uniform (pooled, paper)
    per_source: int = 4  # stratified: examples per source per step (B = per_source × K)
    global_batch: int = 64  # uniform: examples per step, over all ranks (B)
    val_batch: int = 16  # validation examples per step, over all ranks
    micro_batch_size: int | None = None  # sequences per forward per rank; None: A = 1
    world_size: int | None = None  # ranks the batch is laid out for; None: any that divides
    micro_batches: int | None = None  # older per-rank count of micro-batches (not with the above)

    def __post_init__(self):
        _check(len(self.sources) > 0, "data.sources", "list at least one training source")
        _check(len(self.validation) > 0, "data.validation", "list at least one validation file")
        _check(
            self.batch_mode in ("stratified", "uniform"),
            "data.batch_mode",
            f"expected stratified or uniform, got {self.batch_mode!r}",
        )
        for k in ("max_length", "per_source", "global_batch", "val_batch", "micro_batch_size",
                  "world_size", "micro_batches"):
            v = getattr(self, k)
            _check(
                v is None and k in ("micro_batch_size", "world_size", "micro_batches")
                or isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                f"data.{k}", f"need a positive integer, got {v!r}",
            )
        _check(self.max_length >= 2, "data.max_length",  # one prompt token, one target
               f"need at least 2 tokens, got {self.max_length!r}")
        _check(self.num_proc is None or self.num_proc >= 1, "data.num_proc",
               f"need a positive integer or null, got {self.num_proc!r}")
        _check(self.micro_batch_size is None or self.micro_batches is None, "data.micro_batches",
               "the older per-rank count of micro-batches; give data.micro_batch_size instead "
               "(not both)")
        if self.world_size is not None:
            self.batch_shape(self.world_size)
        elif self.micro_batch_size is not None:  # the divisions that need no world size: A = 1
            self.batch_shape(max(1, self.train_batch // self.micro_batch_size))

    def train_batch_for(self, mode: str | None = None) -> int:
        """B, the global training batch of ``mode`` (default ``batch_mode``)."""
        mode = self.batch_mode if mode is None else mode
        return self.per_source * len(self.sources) if mode == "stratified" else self.global_batch

    @property
    def train_batch(self) -> int:
        """B, the global training batch of ``batch_mode``."""
        return self.train_batch_for()

    def batch_shape(self, world_size: int | None = None, mode: str | None = None):
        """The split over ``world_size`` ranks (default ``data.world_size``, else 1) as a
        :class:`~scalebio.llm.data.batching.BatchShape`; ``ConfigError`` naming the fields and
        the arithmetic when it does not divide, or when ``data.world_size`` says otherwise."""
        from scalebio.llm.data.batching import batch_shape

        if world_size is None:
            world_size = self.world_size or 1
        if self.world_size is not None and world_size != self.world_size:
            raise ConfigError(
                f"data.world_size: the batch is laid out for {self.world_size} ranks but "
                f"{world_size} were launched; pass --data.world_size {world_size} to keep the "
                f"global batch and recompute the accumulation steps")
        mode = self.batch_mode if mode is None else mode
        b = self.train_batch_for(mode)
        train = (f"training batch (data.per_source {self.per_source} × {len(self.sources)} "
                 "sources)" if mode == "stratified" else "training batch (data.global_batch)")
        labels = {"train": train, "val": "data.val_batch", "mbs": "data.micro_batch_size",
                  "micro": "data.micro_batches",
                  "world": "world size" if self.world_size is None else "data.world_size"}
        try:
            return batch_shape(b, self.val_batch, world_size, self.micro_batch_size,
                               self.micro_batches, labels=labels)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def split_args(self, world_size: int, mode: str | None = None) -> dict:
        """StepSampler's split keywords for ``world_size`` ranks, after :meth:`batch_shape`'s
        checks: ``StepSampler(..., **cfg.data.split_args(world, mode))``."""
        self.batch_shape(world_size, mode)
        if self.micro_batches is not None:
            return {"micro_batches": self.micro_batches}
        return {"micro_batch_size": self.micro_batch_size}

    def source_specs(self) -> list[SourceSpec]:
        return [_spec(s, f"data.sources[{i}]", None) for i, s in enumerate(self.sources)]

    def validation_specs(self) -> list[SourceSpec]:
        return [
            _spec(s, f"data.validation[{i}]", f"validation{i}")
            for i, s in enumerate(self.validation)
        ]


def _spec(entry, key: str, default_name: str | None) -> SourceSpec:
    _check(isinstance(entry, dict), key, f"expected a mapping with name/path/format, got {entry!r}")
    unknown = set(entry) - {"name", "path", "format"}
    _check(not unknown, key, f"unknown field(s) {sorted(unknown)}")
    name = entry.get("name", default_name)
    _check(name is not None, f"{key}.name", "every training source needs a name")
    _check(str(name).strip() != "", f"{key}.name", f"a non-empty name is required, got {name!r}")
    _check(isinstance(entry.get("path"), str) and entry["path"] != "", f"{key}.path",
           f"a file or folder path is required, got {entry.get('path')!r}")
    try:
        return SourceSpec(
            name=str(name), path=str(entry["path"]), format=str(entry.get("format", "alpaca"))
        )
    except ValueError as e:  # SourceSpec's own checks (the format)
        raise ConfigError(f"{key}: {e}") from None


@dataclass(frozen=True)
class BilevelArgs:
    steps: int = 200
    alpha: float = 1.0  # penalty α₀
    tau: float = 1.0  # α ← τα every alpha_every steps, learning rates × α₀/α (1 = constant α)
    alpha_every: int = 0
    lr_u: float = 1e-3
    lr_w: float = 1e-3
    lr_lambda: float = 5e-2
    optimizer: str = (
        "adamw"  # adamw | sgd (for u and w; λ always uses AdamW unless lambda_optimizer)
    )
    lambda_optimizer: str = "adamw"
    weight_decay: float = 0.0  # u and w (the paper uses 5e-4)
    clip: float | None = None  # max grad norm of u and w, in units of α (the paper clips at 1·α)
    schedule: str = "cosine"  # cosine | constant (shared shape for all three learning rates)
    warmup_ratio: float = 0.03
    order: str = (
        "simultaneous"  # simultaneous (paper) | alternating (u steps first, 2 extra passes)
    )
    geometry: str = "softmax"  # softmax (paper) | mirror (exponentiated gradient)
    prior: dict | None = None  # {source: weight}, initial weights (uniform if None)
    floor: dict | None = None  # {source: min weight}
    cap: dict | None = None  # {source: max weight}
    fixed: dict | None = None  # {source: weight} held constant
    inner_steps_u: int = 1  # u's steps per outer step (K − 1 extra ones on fresh batches)
    lambda_warmup_steps: int = 0  # first steps in which u and w train and λ stays put
    # trailing steps the run diagnostics read (null: the last half of the run)
    diagnostics_window: int | None = None
    # stop once no weight moved by more than this over the diagnostics window (null: never)
    stop_when_stable: float | None = None

    def __post_init__(self):
        _check(isinstance(self.steps, int) and self.steps >= 1, "bilevel.steps", "need ≥ 1")
        for k, low in (("inner_steps_u", 1), ("lambda_warmup_steps", 0)):
            v = getattr(self, k)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"bilevel.{k}",
                   f"need an integer ≥ {low}, got {v!r}")
        _check(
            self.diagnostics_window is None
            or (isinstance(self.diagnostics_window, int) and self.diagnostics_window >= 2),
            "bilevel.diagnostics_window",
            f"need an integer ≥ 2 or null, got {self.diagnostics_window!r}",
        )
        _check(
            self.stop_when_stable is None
            or (isinstance(self.stop_when_stable, (int, float)) and self.stop_when_stable >= 0),
            "bilevel.stop_when_stable",
            f"need a tolerance ≥ 0 or null, got {self.stop_when_stable!r}",
        )
        _check(
            isinstance(self.alpha, (int, float)) and 0 < self.alpha < float("inf"),
            "bilevel.alpha",
            f"the penalty must be a finite number > 0, got {self.alpha!r}",
        )
        _check(self.tau >= 1, "bilevel.tau", f"must be ≥ 1, got {self.tau!r}")
        _check(
            self.tau == 1 or self.alpha_every >= 1,
            "bilevel.alpha_every",
            "set the number of steps between α increases when tau > 1",
        )
        for k in ("lr_u", "lr_w", "lr_lambda"):
            _check(getattr(self, k) > 0, f"bilevel.{k}", f"must be > 0, got {getattr(self, k)!r}")
        _check(self.optimizer in ("adamw", "sgd"), "bilevel.optimizer", "adamw or sgd")
        _check(
            self.lambda_optimizer in ("adamw", "sgd"), "bilevel.lambda_optimizer", "adamw or sgd"
        )
        _check(self.clip is None or self.clip > 0, "bilevel.clip", "must be > 0 or null")
        _check(self.schedule in ("cosine", "constant"), "bilevel.schedule", "cosine or constant")
        _check(0 <= self.warmup_ratio < 1, "bilevel.warmup_ratio", "must be in [0, 1)")
        _check(
            self.order in ("simultaneous", "alternating"),
            "bilevel.order",
            "simultaneous or alternating",
        )
        _check(self.geometry in ("softmax", "mirror"), "bilevel.geometry", "softmax or mirror")


@dataclass(frozen=True)
class EngineArgs:
    kind: str = "single"  # single | ddp | fsdp2 | deepspeed
    zero_stage: int = 2
    offload: bool = False
    bf16: bool = False
    # sum a step's micro-batch gradients of bf16 weights in fp32 (docs/engines.md, "Precision")
    fp32_grad_accum: bool = True

    def __post_init__(self):
        _check(isinstance(self.fp32_grad_accum, bool), "engine.fp32_grad_accum",
               f"expected true or false, got {self.fp32_grad_accum!r}")
        _check(
            self.kind in ("single", "ddp", "fsdp2", "deepspeed"),
            "engine.kind",
            f"expected single, ddp, fsdp2 or deepspeed, got {self.kind!r}",
        )
        _check(self.zero_stage in (2, 3), "engine.zero_stage", "2 or 3")


@dataclass(frozen=True)
class RunArgs:
    seed: int = 0
    checkpoint_every: int = 50  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    threads: int | None = None  # torch.set_num_threads on CPU

    def __post_init__(self):
        _check(
            self.tracker in ("tensorboard", "wandb", "none"),
            "run.tracker",
            "tensorboard, wandb or none",
        )
        _check(0 <= self.seed < 2**63, "run.seed", f"need an integer in [0, 2^63), got {self.seed}")
        _check(self.threads is None or self.threads >= 1, "run.threads",
               f"need a positive integer or null, got {self.threads!r}")
        _check(self.checkpoint_every >= 0, "run.checkpoint_every", "must be ≥ 0")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be ≥ 1")


def _check_source_maps(b: BilevelArgs, names: list[str]) -> None:
    """prior/floor/cap/fixed: keys are source names, values finite numbers (prior > 0), and the
    simplex they define is feasible (the core's own check, with the key in the message)."""
    import math

    from scalebio import make_simplex

    vectors = {}
    for key in ("prior", "floor", "cap", "fixed"):
        table = getattr(b, key)
        if table is None:
            continue
        unknown = sorted(set(table) - set(names))
        _check(not unknown, f"bilevel.{key}",
               f"unknown source name(s) {unknown}; sources are {names}")
        for n, v in table.items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            _check(ok and (v > 0 if key == "prior" else v >= 0), f"bilevel.{key}.{n}",
                   f"need a finite number {'> 0' if key == 'prior' else '>= 0'}, got {v!r}")
        vectors[key] = {names.index(n): float(v) for n, v in table.items()}
    if not vectors:
        return
    missing = [n for i, n in enumerate(names) if "prior" in vectors and i not in vectors["prior"]]
    _check(not missing, "bilevel.prior", f"give a value for every source; missing {missing}")

    def full(key, default):
        return None if key not in vectors else [vectors[key].get(i, default)
                                                for i in range(len(names))]

    try:
        make_simplex(len(names), geometry=b.geometry, prior=full("prior", None),
                     floor=full("floor", 0.0), cap=full("cap", 1.0), fixed=vectors.get("fixed"))
    except ValueError as e:
        raise ConfigError(f"bilevel: {e}") from None


# LISA is opt-in in a run config: a `lisa` section without `enabled: true` leaves it off.
_SECTION_DEFAULTS = {"lisa": {"enabled": False}}


@dataclass(frozen=True)
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    bilevel: BilevelArgs = field(default_factory=BilevelArgs)
    lisa: LisaConfig = field(default_factory=lambda: LisaConfig(**_SECTION_DEFAULTS["lisa"]))
    engine: EngineArgs = field(default_factory=EngineArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self):
        """Checks across sections, before any file is read: every source entry, unique names,
        and the per-source maps of ``bilevel`` (names, values, feasibility)."""
        names: dict[str, str] = {}
        for i, spec in enumerate(self.data.source_specs()):
            _check(spec.name not in names, f"data.sources[{i}].name",
                   f"duplicate source name {spec.name!r} (also {names.get(spec.name)})")
            names[spec.name] = f"data.sources[{i}]"
        self.data.validation_specs()
        _check_source_maps(self.bilevel, list(names))
        # measured: torch's non-reentrant recomputation finds ZeRO-3's parameters released (shape
        # [0]) and stops with a CheckpointError in the first backward (docs/engines.md)
        e = self.engine
        _check(not (self.model.gradient_checkpointing and e.kind == "deepspeed"
                    and e.zero_stage == 3), "model.gradient_checkpointing",
               "not supported with engine.kind: deepspeed and zero_stage: 3 (ZeRO-3 releases the "
               "parameters the recomputation needs); use engine.kind: fsdp2, or zero_stage: 2")


_SECTION_TYPES = {
    "model": ModelArgs,
    "data": DataArgs,
    "bilevel": BilevelArgs,
    "lisa": LisaConfig,
    "engine": EngineArgs,
    "run": RunArgs,
}
