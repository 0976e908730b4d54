"""LISA: train a few randomly drawn decoder blocks at a time (Pan et al., 2024).

Every ``period`` steps a fresh set of ``n_active`` decoder blocks is drawn; only those blocks, plus
the *persistent* parameters (embeddings, head, final norm, ...), get gradients and optimizer state.

Policy for parameters outside the decoder blocks (``LisaLayout``):

* embeddings = every ``nn.Embedding`` outside the blocks (token and learned position embeddings):
  trained iff ``LisaConfig.train_embeddings`` (default: frozen);
* head = ``model.get_output_embeddings()``: trained iff ``LisaConfig.train_head`` (default:
  trained when it is its own tensor);
* tied embeddings (head weight *is* the token-embedding weight): one tensor cannot be half frozen,
  so a flag that is set decides it, two set flags must agree (otherwise ``ValueError``), and with
  neither set it is frozen;
* everything else outside the blocks (final norm, ...) is small and always trained.

Why the default differs from LISA's paper, which always trains embeddings and head: a trained
input embedding needs a gradient at the bottom of the network, so every backward runs through all
blocks whichever are drawn, while a frozen one lets the backward stop at the lowest drawn block.
Measured side by side (docs/engines.md, "LISA's embeddings and head"): a ScaleBiO step costs 2.54×
an SFT step with both trained and 2.13× with the head alone (a 10M Llama), and on a tied 135M
model freezing the shared matrix makes the step 0.68× as long; the weights of the real-model demo
rank its sources the same way with it frozen.

The draw is a pure function of ``(seed, step // period, stream)`` so that every rank draws the same
blocks without communication and a resumed run draws what the interrupted one would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

_STREAMS = ("u", "w")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class LisaConfig:
    """LISA settings: the engines' ``lisa`` argument and the ``lisa`` section of a run config.

    Attributes:
        enabled: LISA on. An engine given a disabled config trains every block, as with ``None``.
            A run config's ``lisa`` section is off unless it says ``enabled: true``.
        n_active: number of decoder blocks trained at a time (all blocks if ≥ the block count).
        period: steps between two draws.
        train_embeddings: train the embeddings outside the blocks (``None``: no, or, when tied
            to the head, whatever ``train_head`` says).
        train_head: train the output head (``None``: yes when untied; a head tied to the
            embeddings follows ``train_embeddings``, frozen when neither is set).
        joint: u and w share one draw, which lowers the variance of ℓ̄(w) − ℓ̄(u) (otherwise
            each model has its own stream).
    """

    enabled: bool = True
    n_active: int = 2
    period: int = 20
    train_embeddings: bool | None = None
    train_head: bool | None = None
    joint: bool = False

    def __post_init__(self) -> None:
        for key in ("n_active", "period"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"LisaConfig.{key} (lisa.{key}) must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"LisaConfig.{key} (lisa.{key}) must be >= 1, got {value}")


class LisaLayout(NamedTuple):
    """How a model's parameters split under LISA.

    Attributes:
        blocks_path: dotted path of the decoder-block ``nn.ModuleList``.
        blocks: the parameters of each block, in block order.
        persistent: parameters outside the blocks that are always trained.
        frozen: parameters outside the blocks that are never trained (policy flags off).
        persistent_names / frozen_names: their dotted names (for checkpoints and messages).
    """

    blocks_path: str
    blocks: tuple[tuple[nn.Parameter, ...], ...]
    persistent: tuple[nn.Parameter, ...]
    frozen: tuple[nn.Parameter, ...]
    persistent_names: tuple[str, ...]
    frozen_names: tuple[str, ...]


# ---------------------------------------------------------------------------- finding the blocks
def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the decoder blocks of any HF causal LM without per-family code.

    Candidates are ``nn.ModuleList`` s whose children all have the same class. When the model has
    ``config.num_hidden_layers``, candidates of that length are preferred; among the rest the one
    holding the most parameters wins (ties: the shortest path).

    Args:
        model: the model (HF ``PreTrainedModel`` or any ``nn.Module``).

    Returns:
        ``(dotted_path, blocks)`` with ``model.get_submodule(dotted_path) is blocks``.

    Raises:
        ValueError: if the model has no homogeneous ``nn.ModuleList``.
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        candidates.append((name, module))
    if not candidates:
        raise ValueError(
            f"find_decoder_blocks: {type(model).__name__} has no nn.ModuleList of identical blocks"
        )
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    matching = [c for c in candidates if len(c[1]) == n_layers]
    pool = matching or candidates
    name, blocks = max(pool, key=lambda c: (_param_count(c[1]), -len(c[0])))
    return name, blocks


def lisa_layout(
    model: nn.Module, cfg: LisaConfig | None, blocks_path: str | None = None
) -> LisaLayout:
    """Split ``model``'s parameters into blocks, persistent and frozen ones (policy: module doc).

    Args:
        model: the model.
        cfg: the LISA config; ``None`` (or a disabled one) means every parameter outside the
            blocks is persistent.
        blocks_path: dotted path of the blocks (default: ``find_decoder_blocks``); wrappers that
            change module classes (FSDP2) pass the path found before wrapping.

    Returns:
        The ``LisaLayout``.

    Raises:
        ValueError: tied embeddings with ``train_embeddings != train_head``.
    """
    if cfg is not None and not cfg.enabled:
        cfg = None
    if blocks_path is None:
        try:
            path, blocks = find_decoder_blocks(model)
        except ValueError:
            if cfg is not None:
                raise
            path, blocks = "", ()  # no LISA: a model without decoder blocks trains as a whole
    else:
        path, blocks = blocks_path, model.get_submodule(blocks_path)
    block_params = tuple(tuple(b.parameters()) for b in blocks)
    in_blocks = {id(p) for ps in block_params for p in ps}
    train_emb = True if cfg is None else cfg.train_embeddings
    train_head = True if cfg is None else cfg.train_head

    embedding_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and id(module.weight) not in in_blocks:
            embedding_ids.add(id(module.weight))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    tied = embedding_ids & head_ids
    if tied and None not in (train_emb, train_head) and train_emb != train_head:
        raise ValueError(
            "LisaConfig.train_embeddings and LisaConfig.train_head must agree for a model with "
            f"tied input/output embeddings, got train_embeddings={train_emb}, "
            f"train_head={train_head}"
        )
    # the shared tensor of tied embeddings: a set flag decides, frozen when neither is set
    train_tied = bool(train_head if train_emb is None else train_emb)
    train_emb = False if train_emb is None else train_emb
    train_head = True if train_head is None else train_head

    persistent, frozen, persistent_names, frozen_names = [], [], [], []
    for name, p in model.named_parameters():  # named_parameters() already drops tied duplicates
        if id(p) in in_blocks:
            continue
        if id(p) in tied:
            keep = train_tied
        else:
            keep = (train_emb if id(p) in embedding_ids else True) and (
                train_head if id(p) in head_ids else True)
        (persistent if keep else frozen).append(p)
        (persistent_names if keep else frozen_names).append(name)
    return LisaLayout(
        path, block_params, tuple(persistent), tuple(frozen),
        tuple(persistent_names), tuple(frozen_names),
    )


def apply_active_blocks(layout: LisaLayout, active: list[int] | None) -> None:
    """Set ``requires_grad`` per the layout: active blocks and persistent params on, rest off.

    Args:
        layout: from ``lisa_layout``.
        active: indices of the trainable blocks; ``None`` = every block.
    """
    active_set = set(range(len(layout.blocks))) if active is None else set(active)
    for i, params in enumerate(layout.blocks):
        for p in params:
            p.requires_grad_(i in active_set)
    for p in layout.persistent:
        p.requires_grad_(True)
    for p in layout.frozen:
        p.requires_grad_(False)


def check_active(active: list[int] | None, num_blocks: int) -> list[int] | None:
    """Validate and normalize (sort, dedupe) a list of active block indices.

    Raises:
        ValueError: an index outside ``[0, num_blocks)``.
    """
    if active is None:
        return None
    out = sorted({int(i) for i in active})
    if out and (out[0] < 0 or out[-1] >= num_blocks):
        raise ValueError(f"active blocks {active} out of range for {num_blocks} blocks")
    return out


# ---------------------------------------------------------------------------- the draw
def _splitmix64(x: int) -> int:
    # Stable integer mixing (Python's hash() of str is salted per process, so it cannot be used).
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def active_blocks_for(
    step: int, seed: int, num_blocks: int, cfg: LisaConfig, stream: str
) -> list[int]:
    """Blocks trained at ``step``: ``n_active`` distinct indices, uniform without replacement.

    The draw depends only on ``(seed, step // cfg.period, stream)`` (``stream`` is ignored when
    ``cfg.joint``), through a ``torch.Generator`` seeded by a stable hash of those three values.

    Args:
        step: optimizer step (≥ 0).
        seed: run seed.
        num_blocks: number of decoder blocks.
        cfg: LISA config.
        stream: ``"u"`` or ``"w"``, the model the draw is for.

    Returns:
        Sorted block indices (all blocks when ``cfg.n_active >= num_blocks``).
    """
    if stream not in _STREAMS:
        raise ValueError(f"stream must be one of {_STREAMS}, got {stream!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if cfg.n_active >= num_blocks:
        return list(range(num_blocks))
    stream_id = 0 if cfg.joint else 1 + _STREAMS.index(stream)
    key = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (step // cfg.period)) ^ stream_id)
    gen = torch.Generator().manual_seed(key & ((1 << 63) - 1))
    return sorted(torch.randperm(num_blocks, generator=gen)[: cfg.n_active].tolist())
