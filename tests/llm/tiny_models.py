"""Tiny HF causal LMs built from configs (no downloads) for the engine and LISA tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
)

VOCAB = 96
# LISA's paper policy (embeddings and head always trained, not the library default): the engine
# tests use it so that state outside the blocks is carried, saved and restored
PAPER_LISA = {"train_embeddings": True, "train_head": True}
HIDDEN = 32
FFN = 64
HEADS = 4

# family -> config; each has `LAYERS[family]` decoder blocks.
LAYERS = {"llama": 4, "qwen2": 3, "gemma2": 2, "mistral": 2, "gpt2": 3, "gpt_neox": 2, "phi": 2}


def tiny_config(family: str, num_layers: int | None = None, tie: bool | None = None):
    """A tiny config of ``family`` (one of ``LAYERS``)."""
    n = LAYERS[family] if num_layers is None else num_layers
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=n,
                          num_attention_heads=HEADS, num_key_value_heads=2,
                          max_position_embeddings=64, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=n,
                          num_attention_heads=HEADS, num_key_value_heads=2,
                          max_position_embeddings=64, **common)
    elif family == "gemma2":
        cfg = Gemma2Config(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=n,
                           num_attention_heads=HEADS, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=64, sliding_window=16, **common)
    elif family == "mistral":
        cfg = MistralConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=n,
                            num_attention_heads=HEADS, num_key_value_heads=2,
                            max_position_embeddings=64, **common)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=HIDDEN, n_layer=n, n_head=HEADS, n_inner=FFN, n_positions=64,
                         **common)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=n,
                            num_attention_heads=HEADS, max_position_embeddings=64, **common)
    elif family == "phi":
        cfg = PhiConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=n,
                        num_attention_heads=HEADS, max_position_embeddings=64, **common)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(LAYERS)}")
    if tie is not None:
        cfg.tie_word_embeddings = tie
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, num_layers: int | None = None,
               tie: bool | None = None, dtype: torch.dtype = torch.float32):
    """A tiny model with deterministic weights.

    Matrices (≥ 2-D params) are redrawn from N(0, 0.02²) with an explicit generator; 1-D params
    keep the family's constant init (norm scales, zero biases). HF's own init runs under a forked
    RNG with a fixed seed, so the caller's global RNG is untouched.
    """
    cfg = tiny_config(family, num_layers, tie)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(dtype)


def token_batch(seed: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    """Random token ids in [3, VOCAB) (ids 0-2 are special)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``model`` on ``ids``."""
    return model(input_ids=ids, labels=ids).loss


# ---------------------------------------------------------------------------- reference LISA loop
def block_prefix(family: str = "llama") -> str:
    """Dotted prefix of the decoder blocks, written out per family (independent of the library)."""
    return {"gpt2": "transformer.h.", "gpt_neox": "gpt_neox.layers."}.get(family, "model.layers.")


def reference_lisa_step(model, state: dict, active: list[int], lr: float, prefix: str,
                        spec_kwargs: dict) -> None:
    """Switch a plain-torch LISA optimizer to ``active`` (kept if unchanged) — the reference.

    ``state`` holds ``{"opt": AdamW | None, "active": list | None}``. Active blocks and every
    non-block parameter train; a param trainable before and after a switch (non-block params,
    blocks drawn again) keeps its AdamW state, a block that comes back after an absence starts
    fresh.
    """
    if state.get("active") == active:
        return
    blocks = {}
    persistent = []
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            blocks.setdefault(int(name[len(prefix):].split(".")[0]), []).append(p)
        else:
            persistent.append(p)
    for i, params in blocks.items():
        for p in params:
            p.requires_grad_(i in active)
    act = [p for i in active for p in blocks[i]]
    opt = torch.optim.AdamW([{"params": persistent}, {"params": act}], lr=lr, **spec_kwargs)
    old = state.get("opt")
    if old is not None:
        for p in persistent + act:
            if p in old.state:
                opt.state[p] = old.state[p]
    state["opt"], state["active"] = opt, active


def reference_step(state: dict, lr: float, clip: float | None) -> float:
    """Clip (torch.nn.utils.clip_grad_norm_), AdamW step, zero grads; return the pre-clip norm."""
    opt = state["opt"]
    params = [p for g in opt.param_groups for p in g["params"]]
    for g in opt.param_groups:
        g["lr"] = lr
    if clip is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)
