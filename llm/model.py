"""Causal LMs for the two ScaleBiO copies: loaded from a local folder or built from a config.

ScaleBiO trains two copies of one model, u (copy "z") and w (copy "y"), which start identical.
One is made with :func:`load_model`, the other with :func:`copy_model`. Nothing here touches the
network: folders are read with ``local_files_only=True``; configs go to ``AutoConfig.for_model``.
A model built from a config is initialised by the model family's own HF init under a scoped seed, so
the same ``seed`` gives the same weights and the caller's global RNG stream is left untouched.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PreTrainedModel

from scalebio.llm.data.tokenizer import CHAR_SPECIAL_TOKENS, char_vocab

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The demo's model, sized by a prototype run: 200 steps of 6 sources x 16 examples take ~2.5 min on
# one CPU thread. The vocabulary and special-token ids are those of llm.tokenizer.char_tokenizer().
TINY_LLAMA: dict = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "vocab_size": len(char_vocab()),
    "pad_token_id": CHAR_SPECIAL_TOKENS.index("<pad>"),
    "bos_token_id": CHAR_SPECIAL_TOKENS.index("<s>"),
    "eos_token_id": CHAR_SPECIAL_TOKENS.index("</s>"),
    "tie_word_embeddings": False,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a torch dtype among those) to a torch dtype.

    Raises:
        ValueError: for any other value, naming the argument ``dtype``.
    """
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


def load_model(
    path: str | None = None,
    config: dict | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load an ``AutoModelForCausalLM`` from a local folder, or build a fresh one from a config.

    Exactly one of ``path`` and ``config`` is given. Both routes run under
    ``torch.random.fork_rng`` seeded with ``seed``: the fresh model's init (and any weight a
    checkpoint lacks) is a function of ``seed`` alone, and the global RNG state is restored after.

    Args:
        path: folder written by ``save_pretrained`` (``config.json`` + weights); read offline.
        config: e.g. ``{"model_type": "llama", "hidden_size": 128, ...}``; ``model_type`` is
            required and the other keys go to ``AutoConfig.for_model``. Not modified.
        dtype: parameter dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        trust_remote_code: allow a checkpoint's own modelling code; off unless asked for.
        seed: seed of the weight init.
        attn_implementation: e.g. ``"eager"`` or ``"sdpa"``; ``None`` keeps the HF default.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: both or neither of ``path``/``config``; ``config`` without a known
            ``model_type``; a model type with no causal-LM head; a bad ``dtype``.
        FileNotFoundError: ``path`` is not a folder or has no ``config.json``.
    """
    if (path is None) == (config is None):
        raise ValueError("give exactly one of path (a local model folder) and config (a dict)")
    torch_dtype = resolve_dtype(dtype)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if path is not None:
            model = _from_folder(path, torch_dtype, trust_remote_code, extra)
        else:
            model = _from_config(config, torch_dtype, trust_remote_code, extra)
    model.train()
    return model


def _from_folder(path: str, dtype: torch.dtype, trust_remote_code: bool, extra: dict):
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model path {path!r} is not a folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r} has no config.json")
    return AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, dtype=dtype, trust_remote_code=trust_remote_code,
        **extra,
    )


def _from_config(config: dict, dtype: torch.dtype, trust_remote_code: bool, extra: dict):
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError("config has no 'model_type' (e.g. 'llama', 'gpt2', 'qwen2')")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config model_type {model_type!r} is not a transformers model type")
    hf_config = AutoConfig.for_model(model_type, **fields)
    try:
        return AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, trust_remote_code=trust_remote_code, **extra
        )
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise ValueError(
            f"config model_type {model_type!r} has no causal-LM model (AutoModelForCausalLM)"
        ) from error


def copy_model(model: nn.Module) -> nn.Module:
    """Return an independent, identical copy of ``model`` (same weights, config, mode, dtype).

    Used for the second ScaleBiO copy: u and w must start identical and then train separately, so
    the copy shares no storage with the original. Call it before handing either model to an
    engine: a ZeRO-3 partitioned model cannot be deep-copied meaningfully.

    Raises:
        ValueError: if ``model`` has DeepSpeed ZeRO-3 partitioned parameters.
    """
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("model is already partitioned by DeepSpeed ZeRO-3; copy it before that")
    return copy.deepcopy(model)
