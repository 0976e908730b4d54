"""Tokenizers built offline (character-level; byte-level BPE trained on given text), with chat
templates, and a loader for saved ones.

The demo trains tiny models from scratch, so it needs a tokenizer that exists without any download.
One token per character keeps the vocabulary at about a hundred entries and makes every prompt /
response boundary land exactly between two tokens, so rendering a prefix and tokenising it always
yields a prefix of the full token sequence.

Token ids are fixed: the special tokens come first, in the order of :data:`CHAR_SPECIAL_TOKENS`
(``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, then the three role markers), followed by
the alphabet's characters in order. ``llm.model.TINY_LLAMA`` relies on this layout.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SYSTEM_MARKER, USER_MARKER, ASSISTANT_MARKER = "<|system|>", "<|user|>", "<|assistant|>"
CHAR_SPECIAL_TOKENS = (
    PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, SYSTEM_MARKER, USER_MARKER, ASSISTANT_MARKER,
)
# string.printable: digits, ASCII letters, punctuation and the six whitespace characters.
DEFAULT_ALPHABET = string.printable

# <s><|user|>question<|assistant|>answer</s>: each assistant turn ends with eos so the model learns
# to stop; add_generation_prompt appends the assistant marker only, so the rendered prompt is an
# exact prefix of the rendered conversation (the data pipeline's response mask relies on it).
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM_MARKER + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER_MARKER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    + ASSISTANT_MARKER + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('char chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_MARKER + "{% endif %}"
)


def char_vocab(alphabet: str | None = None) -> dict[str, int]:
    """The token -> id map of :func:`char_tokenizer`: special tokens, then each character once.

    Args:
        alphabet: characters to give an id, in order; duplicates are ignored. ``None`` means
            :data:`DEFAULT_ALPHABET`.

    Returns:
        The vocabulary, ids ``0 .. len - 1``.

    Raises:
        ValueError: if ``alphabet`` is empty.
    """
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    if not alphabet:
        raise ValueError("alphabet must contain at least one character")
    vocab = {token: i for i, token in enumerate(CHAR_SPECIAL_TOKENS)}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    return vocab


def char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """Build a character-level HF fast tokenizer with pad/bos/eos/unk and a user/assistant template.

    Each character of ``alphabet`` is one token (a ``WordLevel`` model over single characters,
    after a pre-tokenizer that isolates every character); any other character maps to ``<unk>``.
    Decoding concatenates tokens without separators, so ``decode(encode(s)) == s`` for text over
    the alphabet. Encoding adds no special tokens by itself; the chat template adds ``<s>`` and
    ``</s>``. The result survives ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Args:
        alphabet: the characters of the vocabulary; ``None`` means :data:`DEFAULT_ALPHABET`.

    Returns:
        The tokenizer, with ``chat_template`` = :data:`CHAR_CHAT_TEMPLATE`.
    """
    vocab = char_vocab(alphabet)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # [\s\S] matches any character including newline (unlike "."), so each one is its own piece.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Registered as special so "<s>" in rendered templates is one token, not four characters.
    backend.add_special_tokens(list(CHAR_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAR_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML: every message is "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt is
# "<|im_start|>assistant\n". Response boundaries fall inside a pre-tokeniser piece ("assistant\n"
# + response), as with real BPE chat models, so the data pipeline's boundary rule is exercised.
BPE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{{ message['content'] }}<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


def bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 8000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokeniser, no download) on ``corpus``.

    It stands in for a model's tokenizer where speed matters (benchmarks, scale tests): the
    pre-tokeniser and merges cost what they cost in real BPE tokenizers, unlike one token per
    character. Every byte is in the alphabet, so no text maps to an unknown token.

    Args:
        corpus: training text; the merges learnt depend on it (and only on it: training is
            deterministic).
        vocab_size: target vocabulary size, special tokens and the 256 byte tokens included.

    Returns:
        The tokenizer, with eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, and
        ``chat_template`` = :data:`BPE_CHAT_TEMPLATE`.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=BPE_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def load_tokenizer(path_or_name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer: ``"char"`` builds :func:`char_tokenizer`, anything else is a local folder.

    Args:
        path_or_name: ``"char"`` or the path of a folder written by ``save_pretrained`` (no hub
            access: the folder is read with ``local_files_only=True``).

    Returns:
        The tokenizer. A tokenizer without a pad token gets ``pad_token = eos_token`` so batches
        can be padded (padding positions are masked out of every loss).

    Raises:
        FileNotFoundError: if the folder does not exist or holds no tokenizer files.
        ValueError: if the loaded tokenizer has neither a pad nor an eos token.
    """
    if path_or_name == "char":
        return char_tokenizer()
    folder = Path(path_or_name)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer path {path_or_name!r} is not a folder (or 'char')")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"tokenizer path {path_or_name!r} has no tokenizer.json or tokenizer_config.json"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path_or_name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
