"""Tests of the offline tokenizers (character, byte-level BPE), their chat templates and the
tokenizer loader."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalebio.llm.data.tokenizer import (
    BPE_SPECIAL_TOKENS,
    CHAR_CHAT_TEMPLATE,
    CHAR_SPECIAL_TOKENS,
    DEFAULT_ALPHABET,
    bpe_tokenizer,
    char_tokenizer,
    char_vocab,
    load_tokenizer,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 37 + 58?"},
    {"role": "assistant", "content": "95"},
]


# Hypothesis tests cannot take function-scoped fixtures; one read-only instance serves them.
_SHARED = char_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_vocabulary_layout(tokenizer):
    assert len(tokenizer) == len(CHAR_SPECIAL_TOKENS) + len(DEFAULT_ALPHABET)
    for i, token in enumerate(CHAR_SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == i
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (0, 1)
    assert (tokenizer.eos_token_id, tokenizer.unk_token_id) == (2, 3)
    first_char = len(CHAR_SPECIAL_TOKENS)
    assert tokenizer.convert_tokens_to_ids(DEFAULT_ALPHABET[0]) == first_char
    assert tokenizer.convert_tokens_to_ids(DEFAULT_ALPHABET[-1]) == first_char + 99


@settings(derandomize=True, deadline=None, max_examples=60)
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=80))
def test_one_token_per_character_and_exact_round_trip(text):
    tokenizer = _SHARED
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    vocab = char_vocab()
    assert ids == [vocab[c] for c in text]  # no special tokens added, whitespace kept
    assert tokenizer.decode(ids) == text


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer("a\u00e9b")["input_ids"]
    assert ids == [char_vocab()["a"], tokenizer.unk_token_id, char_vocab()["b"]]


def test_special_tokens_are_single_tokens_and_skippable(tokenizer):
    ids = tokenizer("<s>hi</s>")["input_ids"]
    assert ids == [1, char_vocab()["h"], char_vocab()["i"], 2]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_template_rendering(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == "<s><|system|>Be brief.<|user|>What is 37 + 58?<|assistant|>95</s>"
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s><|system|>Be brief.<|user|>What is 37 + 58?<|assistant|>"


def test_prompt_tokens_are_a_prefix_of_the_conversation_tokens(tokenizer):
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=True, add_generation_prompt=True
    )["input_ids"]
    assert full[: len(prompt)] == prompt
    # The response part is exactly the answer's characters, then eos.
    assert full[len(prompt):] == [char_vocab()["9"], char_vocab()["5"], tokenizer.eos_token_id]
    assert full[0] == tokenizer.bos_token_id


def test_unknown_role_is_rejected(tokenizer):
    with pytest.raises(Exception, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_reload_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.chat_template == CHAR_CHAT_TEMPLATE
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(reloaded, name) == getattr(tokenizer, name)
    text = "def f(x):\n    return x + 1  # ok"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"] == (
        tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    )


def test_load_tokenizer_char_and_errors(tmp_path):
    assert load_tokenizer("char").get_vocab() == char_vocab()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_load_tokenizer_sets_missing_pad_to_eos(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token_id == reloaded.eos_token_id == 2


def test_custom_alphabet():
    tokenizer = char_tokenizer("abca")
    assert len(tokenizer) == len(CHAR_SPECIAL_TOKENS) + 3  # the duplicate "a" counts once
    assert tokenizer("cab")["input_ids"] == [9, 7, 8]
    assert tokenizer("z")["input_ids"] == [tokenizer.unk_token_id]
    with pytest.raises(ValueError, match="alphabet"):
        char_tokenizer("")


# ---------------------------------------------------------------- byte-level BPE


_CORPUS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
_SHARED_BPE = bpe_tokenizer(_CORPUS, 300)  # read-only, shared like _SHARED above


def test_bpe_training_is_deterministic_and_learns_merges():
    first, second = bpe_tokenizer(_CORPUS, 300), bpe_tokenizer(_CORPUS, 300)
    assert first.get_vocab() == second.get_vocab()
    # frequent words became single tokens (a merge-free byte tokenizer would need 3 or more)
    assert len(first("the cat")["input_ids"]) == 2
    assert [first.convert_tokens_to_ids(t) for t in BPE_SPECIAL_TOKENS] == [0, 1, 2]


@settings(derandomize=True, deadline=None, max_examples=40)
@given(st.text(max_size=60))
def test_bpe_round_trips_any_text(text):
    tokenizer = _SHARED_BPE  # byte-level: every string, emoji and control characters included
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_bpe_chat_template_is_chatml_and_prefix_stable():
    tokenizer = _SHARED_BPE
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 37 + 58?"
                    "<|im_end|>\n<|im_start|>assistant\n95<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False,
                                           add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 3  # <|im_end|> is one token, never split
