"""Causal LMs for the two ScaleBiO copies: loaded from a local folder or built from a config.

ScaleBiO trains two copies of one model, u (copy "z") and w (copy "y"), which start identical.
One is made with :func:`load_model`, the other with :func:`copy_model`. Nothing here touches the
network: folders are read with ``local_files_only=True``; configs go to ``AutoConfig.for_model``.
A model built from a config is initialised by the model family's own HF init under a scoped seed, so
the same ``seed`` gives the same weights and the caller's global RNG stream is left untouched.
"""

from __future__ import annotations

import copy
import importlib.util
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
    gradient_checkpointing: bool = False,
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
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"`` (needs the
            flash-attn package); ``None`` keeps the HF default.
        gradient_checkpointing: recompute each decoder block's activations during backward
            instead of keeping them (HF's gradient checkpointing, non-reentrant: see
            :func:`enable_gradient_checkpointing`).

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: both or neither of ``path``/``config``; ``config`` without a known
            ``model_type``; a model type with no causal-LM head; a bad ``dtype``;
            ``attn_implementation="flash_attention_2"`` without the flash-attn package.
        FileNotFoundError: ``path`` is not a folder or has no ``config.json``.
    """
    if (path is None) == (config is None):
        raise ValueError("give exactly one of path (a local model folder) and config (a dict)")
    torch_dtype = resolve_dtype(dtype)
    if attn_implementation == "flash_attention_2" and not _flash_attn_installed():
        raise ValueError(
            "attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
            "installed; use 'sdpa'"
        )
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if path is not None:
            model = _from_folder(path, torch_dtype, trust_remote_code, extra)
        else:
            model = _from_config(config, torch_dtype, trust_remote_code, extra)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder block's activations in backward (one extra forward per backward).

    Non-reentrant (``use_reentrant=False``) on purpose: the reentrant variant gives no gradient to
    a block's parameters when the block's *input* does not require grad, which is exactly the case
    under LISA with frozen embeddings and frozen lower blocks; the non-reentrant one follows the
    parameters' ``requires_grad``, so LISA may flip it between steps. HF also hooks the input
    embeddings to make their output require grad (a workaround for the reentrant variant and for
    adapters); that hook is removed here, since with frozen embeddings it would make every backward
    run down through the frozen lower blocks for nothing.

    Raises:
        ValueError: if the model family has no gradient-checkpointing support in transformers.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} does not support it in transformers"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


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
