"""What ``scalebio plan`` knows of a model without its weights: the architecture and the parameters.

The architecture comes from the config's ``model.config`` dict, else ``model.path/config.json``,
else the bundled ``llm/configs/architectures/<model.architecture>.json``. Both ScaleBiO copies
(u and w) are built on the meta device (shapes only, no memory, about a second at 32B) and split
by :func:`~scalebio.llm.engines.lisa.lisa_layout`, the function the engines use, so the trainable
set is exactly theirs: the persistent parameters (embeddings/head by the ``lisa`` policy, final
norm) plus ``n_active`` decoder blocks, or everything without LISA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from scalebio.llm.config import ARCHITECTURES, Config, ConfigError

# Decoder families whose block is pre-norm RMSNorm + rotary attention + gated MLP: the activation
# formula of scalebio.llm.plan_memory is exact for them (checked against measured peaks).
LLAMA_LIKE = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class Arch:
    """The shapes that set activation memory."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def exact(self) -> bool:
        """The activation formula is exact for this family (else an estimate)."""
        return self.model_type in LLAMA_LIKE

    @classmethod
    def from_hf(cls, cfg) -> Arch:
        heads = cfg.num_attention_heads
        inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
        return cls(
            model_type=cfg.model_type, hidden=cfg.hidden_size,
            intermediate=inter or 4 * cfg.hidden_size, layers=cfg.num_hidden_layers,
            heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab=cfg.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class Inventory:
    """One copy's parameter shapes, split as the engines split them."""

    blocks: tuple[tuple[torch.Size, ...], ...]  # per decoder block
    persistent: tuple[torch.Size, ...]  # trained at every step (embeddings/head by policy, norm)
    frozen: tuple[torch.Size, ...]  # outside the blocks, never trained (lisa policy off)
    n_active: int  # blocks trained at a time (all of them without LISA)
    embeddings_trained: bool  # the input embeddings get gradients
    head_trained: bool

    @property
    def total(self) -> int:
        return sum(_numel(s) for s in self.all_shapes)

    @property
    def all_shapes(self) -> tuple[torch.Size, ...]:
        return tuple(s for b in self.blocks for s in b) + self.persistent + self.frozen

    @property
    def block_numel(self) -> int:
        return max(sum(_numel(s) for s in b) for b in self.blocks)

    @property
    def root_shapes(self) -> tuple[torch.Size, ...]:
        """Parameters outside the blocks (FSDP2's root unit)."""
        return self.persistent + self.frozen

    def trainable_shapes(self) -> tuple[torch.Size, ...]:
        """At one LISA draw: the persistent parameters and ``n_active`` (equal-sized) blocks."""
        return self.persistent + tuple(s for b in self.blocks[: self.n_active] for s in b)

    @property
    def trainable(self) -> int:
        return sum(_numel(s) for s in self.trainable_shapes())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def load_architecture(cfg: Config):
    """(HF config, where it came from) for the run's model, without touching weights."""
    from transformers import AutoConfig

    m = cfg.model
    if m.config is not None:
        fields, origin = dict(m.config), "model.config"
    else:
        folder_cfg = Path(m.path) / "config.json"
        if folder_cfg.is_file():
            fields, origin = json.loads(folder_cfg.read_text()), str(folder_cfg)
        elif m.architecture is not None:
            path = ARCHITECTURES / f"{m.architecture}.json"
            fields, origin = json.loads(path.read_text()), f"bundled {m.architecture} ({path.name})"
        else:
            raise ConfigError(f"model.path: {m.path} has no config.json; set model.architecture to "
                              "plan without the weights (bundled: see llm/configs/architectures)")
    fields = {k: v for k, v in fields.items()
              if k not in ("architectures", "torch_dtype", "dtype", "transformers_version")}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{origin}: no model_type")
    try:
        return AutoConfig.for_model(model_type, **fields), origin
    except ValueError as e:
        raise ConfigError(f"{origin}: {e}") from None


def meta_copies(hf_config, dtype: torch.dtype):
    """The two ScaleBiO copies (u, w) on the meta device: shapes, no storage."""
    from transformers import AutoModelForCausalLM

    from scalebio.llm.model import copy_model

    with torch.device("meta"):
        w = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return copy_model(w), w


def inventory(model, cfg: Config) -> Inventory:
    """Split ``model`` with the engines' own :func:`lisa_layout` and the config's ``lisa``."""
    from scalebio.llm.engines.lisa import lisa_layout

    lisa = cfg.lisa if cfg.lisa.enabled else None
    layout = lisa_layout(model, lisa)
    n_blocks = len(layout.blocks)
    if lisa is not None and lisa.n_active > n_blocks:
        raise ConfigError(f"lisa.n_active: {lisa.n_active} > the model's {n_blocks} blocks")
    n_active = n_blocks if lisa is None else lisa.n_active
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    persistent = {id(p) for p in layout.persistent}
    return Inventory(
        blocks=tuple(tuple(p.shape for p in b) for b in layout.blocks),
        persistent=tuple(p.shape for p in layout.persistent),
        frozen=tuple(p.shape for p in layout.frozen),
        n_active=n_active,
        embeddings_trained=id(emb) in persistent,
        head_trained=head is not None and id(head.weight) in persistent,
    )
