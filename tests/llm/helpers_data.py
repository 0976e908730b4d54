"""Offline test helpers for the data pipeline: a character-level tokenizer and tiny sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \n.,:?!") + ["\t"]
# A ChatML-like template. Jinja in HF trims the newline after a block tag, so newlines are literal.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)
# Not prefix-stable: only the last user message is shown, so earlier renderings are not prefixes.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if loop.last or m['role'] == 'assistant' %}<|{{ m['role'] }}|>"
    "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% endif %}"
)


def make_char_tokenizer(chat_template: str | None = None,
                        merges: list[tuple[str, str]] | None = None) -> PreTrainedTokenizerFast:
    """One token per character plus whole special tokens; with ``merges``, a BPE over the whole
    text (no pre-tokeniser), so that merges may straddle a prompt/response boundary."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    if merges:
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        model = models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>")
        backend = Tokenizer(model)
    else:
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=SPECIALS[4:],
    )
    tok.chat_template = chat_template
    return tok


def random_words(rng: np.random.Generator, n_words: int) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, size=int(rng.integers(1, 6))))
                    for _ in range(n_words))


def alpaca_records(n: int, seed: int, max_words: int = 6) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"instruction": random_words(rng, int(rng.integers(1, max_words))),
             "input": random_words(rng, 2) if i % 2 else "",
             "output": random_words(rng, int(rng.integers(1, max_words)))} for i in range(n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def char_ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Reference tokenisation for the character tokenizer: whole special tokens, else one id per
    character — written independently of the tokenizer's own splitting."""
    vocab = tok.get_vocab()
    ids, i = [], 0
    while i < len(text):
        special = next((s for s in SPECIALS if text.startswith(s, i)), None)
        piece = special or text[i]
        ids.append(vocab[piece])
        i += len(piece)
    return ids


def expected_example(tok: PreTrainedTokenizerFast, segments: list[tuple[str, bool]]):
    """(input_ids, labels) for text segments flagged supervised or not, by the reference above."""
    ids, labels = [], []
    for text, supervised in segments:
        seg = char_ids(tok, text)
        ids += seg
        labels += seg if supervised else [-100] * len(seg)
    return ids, labels
