"""Checks that need the config and the model's ``config.json`` but no data and no weights: run
before any tokenisation and before the output folder is touched, so a mistake costs seconds.

:func:`check_run` (``reweight``, ``sft``, the baselines, through ``setup.start_run``): every data
file exists; ``data.cache_dir`` can be a folder; the tracker is installed; the tokenizer loads;
then :func:`check_model`: the model type exists and has a causal-LM head that attends causally
(an encoder such as BERT does not), ``model.config`` has no unknown key, attention heads divide
the hidden size (and key/value heads the heads), the embedding holds every token id of the
tokenizer, ``data.max_length`` fits learned position embeddings (a warning for rotary ones), and
LISA finds decoder blocks (at least ``lisa.n_active`` of them). The model is built on the meta
device (shapes only, no memory), as ``scalebio plan`` does (:mod:`scalebio.llm.plan_arch`).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import logging
import re
from pathlib import Path

import torch

from scalebio.llm.config import Config, ConfigError
from scalebio.llm.data.sources import DataError, SourceSpec

log = logging.getLogger(__name__)

_FOLDER_ONLY_KEYS = ("architectures", "torch_dtype", "dtype", "transformers_version", "auto_map")


def run_inputs(cfg: Config, train: list[SourceSpec]) -> list[Path]:
    """Every file or folder a run reads: what ``--overwrite`` must never delete."""
    paths = [Path(s.path) for s in [*train, *cfg.data.validation_specs()]]
    if cfg.model.path is not None:
        paths.append(Path(cfg.model.path))
    if cfg.model.tokenizer not in (None, "char"):
        paths.append(Path(cfg.model.tokenizer))
    return paths


def check_paths(specs: list[SourceSpec], roles: list[str]) -> None:
    """Each data file or folder exists (a DataError naming the first that does not)."""
    for spec, role in zip(specs, roles):
        if not Path(spec.path).exists():
            raise DataError(f"{spec.path}: {role} {spec.name!r}: no such file or folder")


def check_run(cfg: Config, train: list[SourceSpec], tracker: bool = False):
    """The checks of the module docstring; returns the loaded tokenizer."""
    val = cfg.data.validation_specs()
    check_paths([*train, *val], ["source"] * len(train) + ["validation file"] * len(val))
    cache = cfg.data.cache_dir
    if cache is not None and Path(cache).exists() and not Path(cache).is_dir():
        raise ConfigError(f"data.cache_dir: {cache} exists and is not a folder")
    if tracker:
        check_tracker(cfg.run.tracker)
    tokenizer = load_tokenizer_checked(cfg.model.tokenizer or cfg.model.path, "model.tokenizer")
    check_model(cfg, tokenizer)
    return tokenizer


def check_tracker(kind: str) -> None:
    needs = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}.get(kind, ())
    if needs and not any(importlib.util.find_spec(m) for m in needs):
        raise ConfigError(f"run.tracker: {kind} needs the {needs[0]} package, which is not "
                          f"installed (pip install {needs[0]}), or set run.tracker: none")


def load_tokenizer_checked(name: str, key: str):
    from scalebio.llm.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _one_line(text) -> str:
    """An exception's message on one line, without transformers' validator preamble."""
    line = " ".join(str(text).split())
    return re.sub(r"Class validation error for validator '\w+': \w+Error: ", "", line)


def _fields(cfg: Config, folder: str | None) -> tuple[dict, str]:
    """The model's config fields and where they come from (``model.config`` or a config.json)."""
    if folder is None and cfg.model.config is not None:
        return dict(cfg.model.config), "model.config"
    key = "--model" if folder is not None else "model.path"
    path = Path(folder if folder is not None else cfg.model.path)
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"{key}: {path} has no config.json (not a saved model folder)")
    try:
        fields = json.loads(file.read_text())
    except ValueError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return {k: v for k, v in fields.items() if k not in _FOLDER_ONLY_KEYS}, str(file)


def _known_keys(config_class) -> set[str]:
    keys = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    keys |= set(config_class().to_dict())
    keys |= set(getattr(config_class, "attribute_map", {}) or {})
    return keys


def _build_config(fields: dict, origin: str, remote: bool):
    from transformers import CONFIG_MAPPING, AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    key = "model.config.model_type" if origin == "model.config" else f"{origin}: model_type"
    if not isinstance(model_type, str):
        raise ConfigError(f"{key}: missing (e.g. llama, qwen2, gpt2)")
    if model_type not in CONFIG_MAPPING:
        if remote:
            return None
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{key}: unknown model type {model_type!r}{hint}")
    cls = CONFIG_MAPPING[model_type]
    if origin == "model.config":
        known = _known_keys(cls)
        for k in fields:
            if k not in known and not k.startswith("_"):
                close = difflib.get_close_matches(k, sorted(known), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"model.config.{k}: not a setting of {model_type} "
                                  f"models{hint}")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers' own validation (several exception types)
        raise ConfigError(f"{origin}: {_one_line(e)}") from None


def _meta_model(hf, origin: str):
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf)
    except Exception as e:
        raise ConfigError(f"{origin}: cannot build a causal LM ({_one_line(e)})") from None


def check_model(cfg: Config, tokenizer, folder: str | None = None, lisa: bool = True) -> None:
    """The model checks of the module docstring, on ``cfg.model`` or the saved ``folder``."""
    fields, origin = _fields(cfg, folder)
    hf = _build_config(fields, origin, cfg.model.trust_remote_code)
    if hf is None:  # remote code: its own modelling, nothing we can check safely
        return
    pre = "model.config." if origin == "model.config" else f"{origin}: "
    heads, hidden = getattr(hf, "num_attention_heads", None), getattr(hf, "hidden_size", None)
    kv = getattr(hf, "num_key_value_heads", None)
    if isinstance(heads, int) and heads > 0 and isinstance(hidden, int) \
            and getattr(hf, "head_dim", None) is None and hidden % heads:
        raise ConfigError(f"{pre}num_attention_heads: {heads} heads do not divide hidden_size "
                          f"{hidden}")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        raise ConfigError(f"{pre}num_key_value_heads: {kv} does not divide num_attention_heads "
                          f"{heads}")
    model = _meta_model(hf, origin)
    _check_causal(model, hf, pre)
    emb = model.get_input_embeddings()
    n_tok = len(tokenizer)
    if emb is not None and emb.num_embeddings < n_tok:
        raise ConfigError(f"{pre}vocab_size: the embedding has {emb.num_embeddings} rows but the "
                          f"tokenizer has {n_tok} tokens (ids up to {n_tok - 1}); set vocab_size "
                          f">= {n_tok}")
    _check_positions(model, hf, pre, cfg.data.max_length)
    if lisa and cfg.lisa.enabled:
        from scalebio.llm.plan_arch import inventory

        try:
            inventory(model, cfg)
        except ValueError as e:  # no decoder blocks (ConfigError, also a ValueError, passes)
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"lisa.enabled: LISA needs decoder blocks ({_one_line(e)})") \
                from None


def _check_causal(model, hf, pre: str) -> None:
    """An encoder family's causal-LM class attends both ways unless ``is_decoder`` is set."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if hf.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and \
            not getattr(model.config, "is_decoder", False):
        raise ConfigError(f"{pre}model_type: {hf.model_type} is a bidirectional encoder: each "
                          "token would see the tokens it must predict; use a decoder-only model "
                          "(or set is_decoder: true)")


def _check_positions(model, hf, pre: str, max_length: int) -> None:
    """Learned position embeddings cannot index past their size: an error. Rotary ones can, but
    a model has not seen those positions: a warning."""
    limit = getattr(hf, "max_position_embeddings", None)
    if not isinstance(limit, int) or max_length <= limit:
        return
    token_emb = model.get_input_embeddings()
    learned = any(isinstance(m, torch.nn.Embedding) and m is not token_emb
                  and m.num_embeddings >= limit for m in model.modules())
    # the family's own name of the limit (GPT-2: n_positions)
    name = (getattr(hf, "attribute_map", None) or {}).get("max_position_embeddings",
                                                         "max_position_embeddings")
    if learned:
        raise ConfigError(f"data.max_length: {max_length} > {pre}{name} {limit}, the size of the "
                          "model's learned position embedding; lower data.max_length")
    log.warning("data.max_length %d > %s%s %d: positions past %d are beyond the model's range "
                "(rotary positions extrapolate, but the model has never seen them)", max_length,
                pre, name, limit, limit)

