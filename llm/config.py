"""Run configuration: small frozen dataclasses, read from YAML/JSON, overridden by ``--key value``.

Every field is validated in ``__post_init__`` with the user-facing key in the message
(``bilevel.alpha: …``), and unknown keys are refused with the closest known ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scalebio.llm.data.sources import SourceSpec


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class ModelArgs:
    path: str | None = None  # local folder of an AutoModelForCausalLM (no downloads)
    config: dict | None = None  # or a config dict to build a randomly initialised model
    tokenizer: str | None = None  # "char", a local folder, or None = the model's folder
    dtype: str = "float32"  # float32 | bfloat16 (θ and its optimizer stay float32)
    trust_remote_code: bool = False

    def __post_init__(self):
        _check(
            (self.path is None) != (self.config is None),
            "model",
            "give exactly one of model.path and model.config",
        )
        _check(
            self.dtype in ("float32", "bfloat16", "float64"),
            "model.dtype",
            f"expected float32, bfloat16 or float64, got {self.dtype!r}",
        )
        _check(
            self.path is not None or self.tokenizer is not None,
            "model.tokenizer",
            "a model built from a config needs a tokenizer ('char' or a local folder)",
        )


@dataclass(frozen=True)
class DataArgs:
    sources: tuple = ()  # [{name, path, format}, ...]
    validation: tuple = ()  # [{path, format}, ...] (name optional)
    max_length: int = 512
    cache_dir: str | None = None  # Arrow caches of tokenised data; default: <out>/cache
    batch_mode: str = "stratified"  # stratified (fixed quota per source) | uniform (pooled, paper)
    per_source: int = 4  # stratified: examples per source per step
    global_batch: int = 64  # uniform: examples per step
    val_batch: int = 16  # validation examples per step
    micro_batches: int = 1  # gradient accumulation: micro-batches per step (over all ranks)

    def __post_init__(self):
        _check(len(self.sources) > 0, "data.sources", "list at least one training source")
        _check(len(self.validation) > 0, "data.validation", "list at least one validation file")
        _check(
            self.batch_mode in ("stratified", "uniform"),
            "data.batch_mode",
            f"expected stratified or uniform, got {self.batch_mode!r}",
        )
        for k in ("max_length", "per_source", "global_batch", "val_batch", "micro_batches"):
            v = getattr(self, k)
            _check(
                isinstance(v, int) and v >= 1, f"data.{k}", f"need a positive integer, got {v!r}"
            )

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
    _check("path" in entry, f"{key}.path", "missing")
    return SourceSpec(
        name=str(name), path=str(entry["path"]), format=str(entry.get("format", "alpaca"))
    )


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

    def __post_init__(self):
        _check(isinstance(self.steps, int) and self.steps >= 1, "bilevel.steps", "need ≥ 1")
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
class LisaArgs:
    enabled: bool = False
    n_active: int = 2
    period: int = 20
    train_embeddings: bool = True
    train_head: bool = True
    joint: bool = False  # u and w train the same blocks (lower variance of ℓ̄(w) − ℓ̄(u))

    def __post_init__(self):
        _check(self.n_active >= 1, "lisa.n_active", "need ≥ 1 active block")
        _check(self.period >= 1, "lisa.period", "need ≥ 1 step between draws")


@dataclass(frozen=True)
class EngineArgs:
    kind: str = "single"  # single | ddp | fsdp2 | deepspeed
    zero_stage: int = 2
    offload: bool = False
    bf16: bool = False

    def __post_init__(self):
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
        _check(self.checkpoint_every >= 0, "run.checkpoint_every", "must be ≥ 0")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be ≥ 1")


@dataclass(frozen=True)
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    bilevel: BilevelArgs = field(default_factory=BilevelArgs)
    lisa: LisaArgs = field(default_factory=LisaArgs)
    engine: EngineArgs = field(default_factory=EngineArgs)
    run: RunArgs = field(default_factory=RunArgs)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {
    "model": ModelArgs,
    "data": DataArgs,
    "bilevel": BilevelArgs,
    "lisa": LisaArgs,
    "engine": EngineArgs,
    "run": RunArgs,
}


def _unknown(key: str, options) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], list(options), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}")


def _coerce(value, tp, key: str):
    """Parse a string into the field's type: numbers by Python's rules (YAML 1.1 reads ``1e-3``
    as a string), everything else with YAML syntax (true, null, [..], {..})."""
    if not isinstance(value, str):
        return value
    names = str(tp)
    if "float" in names or "int" in names:
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if "int" in names and "float" not in names:
                if not number.is_integer():
                    raise ConfigError(f"{key}: expected an integer, got {value!r}")
                return int(number)
            return number
    if names in ("str", "<class 'str'>") or names.startswith("str"):
        return value
    return yaml.safe_load(value) if value != "" else None


def _typed(cls, value: dict, section: str) -> dict:
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in value.items()}


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a validated :class:`Config` from nested dicts; ``source`` names the file in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise _unknown(name, _SECTION_TYPES)
        cls = _SECTION_TYPES[name]
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        for k in value:
            if k not in known:
                raise _unknown(f"{name}.{k}", known)
        value = {
            k: tuple(v) if isinstance(v, list) and k in ("sources", "validation") else v
            for k, v in _typed(cls, value, name).items()
        }
        try:
            sections[name] = cls(**value)
        except TypeError as e:
            raise ConfigError(f"{source}: section {name}: {e}") from None
    try:
        return Config(**sections)
    except TypeError as e:  # a required section left out (e.g. data) fails its own checks
        raise ConfigError(f"{source}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--section.key value`` pairs (``--lisa.enabled true``) onto a nested dict."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    if len(overrides) % 2:
        raise ConfigError(f"overrides: expected --key value pairs, got {overrides!r}")
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--") or "." not in flag:
            raise ConfigError(f"overrides: expected --section.key, got {flag!r}")
        section, key = flag[2:].split(".", 1)
        if section not in _SECTION_TYPES:
            raise _unknown(section, _SECTION_TYPES)
        types = typing.get_type_hints(_SECTION_TYPES[section])
        if key not in types:
            raise _unknown(f"{section}.{key}", types)
        out.setdefault(section, {})[key] = _coerce(value, types[key], f"{section}.{key}")
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict]:
    """Read a YAML/JSON file, apply overrides, validate. Returns (config, the raw merged dict)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML/JSON: {e}") from None
    raw = apply_overrides(raw, overrides or [])
    base = p.parent
    for s in list(raw.get("data", {}).get("sources", [])) + list(
        raw.get("data", {}).get("validation", [])
    ):
        if isinstance(s, dict) and "path" in s and not Path(s["path"]).is_absolute():
            s["path"] = str((base / s["path"]).resolve())  # paths are relative to the config file
    return config_from_dict(raw, str(p)), raw
