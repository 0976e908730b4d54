"""llm/data/sources.py: formats, response-only labels, truncation, containers, caching, clear
errors."""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from helpers_data import (
    CHAT_TEMPLATE,
    UNSTABLE_TEMPLATE,
    alpaca_records,
    expected_example,
    make_char_tokenizer,
    write_jsonl,
)
from transformers import PreTrainedTokenizerFast

from scalebio.llm.data.conversations import to_messages
from scalebio.llm.data.sources import DataError, SourceSpec, load_sources

ALPACA = [{"instruction": "add", "input": "2 3", "output": "5"},
          {"instruction": "say hi", "output": "hi"}]
SHAREGPT = [{"conversations": [
    {"from": "system", "value": "be brief"}, {"from": "human", "value": "a?"},
    {"from": "gpt", "value": "yes"}, {"from": "human", "value": "b?"},
    {"from": "gpt", "value": "no"},
]}]


def _load(tmp_path, tok, train, val=None, max_length=64):
    if val is None:  # written once per test: rewriting would change its mtime, a cache key part
        v = tmp_path / "v.jsonl"
        val = [SourceSpec("v", str(v if v.exists() else write_jsonl(v, ALPACA)), "alpaca")]
    return load_sources(train, val, tok, max_length, tmp_path / "cache")


def _rows(ds):
    return [(r["input_ids"], r["labels"]) for r in ds]


# ---------------------------------------------------------------- formats and labels


def test_formats_normalise_to_messages():
    assert to_messages(ALPACA[0], "alpaca", "x") == [
        {"role": "user", "content": "add\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert to_messages(ALPACA[1], "alpaca", "x")[0] == {"role": "user", "content": "say hi"}
    msgs = to_messages(SHAREGPT[0], "sharegpt", "x")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert to_messages({"messages": msgs}, "messages", "x") == msgs


def test_plain_template_labels_are_the_responses(tmp_path):
    tok = make_char_tokenizer()
    data = _load(tmp_path, tok, [SourceSpec("a", str(write_jsonl(tmp_path / "a.jsonl", ALPACA)),
                                            "alpaca")])
    want = [
        expected_example(tok, [("<bos><|user|>\nadd\n\n2 3\n<|assistant|>\n", False),
                               ("5<eos>", True)]),
        expected_example(tok, [("<bos><|user|>\nsay hi\n<|assistant|>\n", False),
                               ("hi<eos>", True)]),
    ]
    assert _rows(data.train[0]) == want
    assert data.train[0]["n_target"] == [2, 3]


def test_chat_template_multi_turn_supervises_every_assistant_turn(tmp_path):
    tok = make_char_tokenizer(CHAT_TEMPLATE)
    path = write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    data = _load(tmp_path, tok, [SourceSpec("s", str(path), "sharegpt")])
    want = expected_example(tok, [
        ("<bos><|system|>\nbe brief\n<|user|>\na?\n<|assistant|>\n", False),
        ("yes<eos>\n", True), ("<|user|>\nb?\n<|assistant|>\n", False), ("no<eos>\n", True)])
    assert _rows(data.train[0]) == [want]


def test_merge_across_boundary_follows_documented_rule(tmp_path, caplog):
    # BPE merge "\n"+"o" straddles the end of the generation prompt "<|assistant|>\n" and "ok".
    tok = make_char_tokenizer(merges=[("\n", "o")])
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "ok"}])
    with caplog.at_level(logging.WARNING, logger="scalebio.llm.data.sources"):
        data = _load(tmp_path, tok, [SourceSpec("a", str(path), "alpaca")])
    v = tok.get_vocab()
    prompt = [v[c] for c in ["<bos>", "<|user|>", "\n", "h", "i", "\n", "<|assistant|>"]]
    response = [v["\no"], v["k"], v["<eos>"]]  # the straddling token is supervised at a start
    assert _rows(data.train[0]) == [(prompt + response, [-100] * len(prompt) + response)]
    assert "1 response boundaries fall inside a token" in caplog.text


def test_truncation_drops_examples_without_response_tokens(tmp_path):
    tok = make_char_tokenizer()
    records = alpaca_records(40, seed=3, max_words=8)
    path = write_jsonl(tmp_path / "a.jsonl", records)
    full = _load(tmp_path, tok, [SourceSpec("a", str(path), "alpaca")], max_length=1000)
    max_length = 30
    # reference: an example survives iff some supervised target sits at a position in [1, L)
    survivors = [(i, l[:max_length]) for i, l in _rows(full.train[0])
                 if any(y != -100 for y in l[1:max_length])]
    assert 0 < len(survivors) < len(records)  # the setting exercises both outcomes
    data = _load(tmp_path, tok, [SourceSpec("a", str(path), "alpaca")], max_length=max_length)
    assert _rows(data.train[0]) == [(i[:max_length], l) for i, l in survivors]
    assert data.dropped["a"] == len(records) - len(survivors)
    assert data.train[0]["n_target"] == [sum(y != -100 for y in l[1:]) for _, l in survivors]


def test_record_without_assistant_turn_is_dropped_and_counted(tmp_path):
    records = [{"messages": [{"role": "user", "content": "hi"}]},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                 "content": "yo"}]},
               {"messages": []}]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    data = _load(tmp_path, make_char_tokenizer(CHAT_TEMPLATE), [SourceSpec("m", str(path),
                                                                           "messages")])
    assert len(data.train[0]) == 1 and data.dropped["m"] == 2


def test_containers_give_identical_tokens(tmp_path):
    tok = make_char_tokenizer(CHAT_TEMPLATE)
    records = alpaca_records(12, seed=1)
    (tmp_path / "list.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
    Dataset.from_list(records).save_to_disk(str(tmp_path / "folder"))
    specs = [SourceSpec("jsonl", str(write_jsonl(tmp_path / "a.jsonl", records)), "alpaca")]
    specs += [SourceSpec(n, str(tmp_path / n), "alpaca")
              for n in ("list.json", "lines.json", "p.parquet", "folder")]
    data = _load(tmp_path, tok, specs)
    first = _rows(data.train[0])
    assert len(first) == 12
    for ds in data.train[1:]:
        assert _rows(ds) == first


def test_validation_sources_are_concatenated_and_named(tmp_path):
    tok = make_char_tokenizer()
    v1 = write_jsonl(tmp_path / "v1.jsonl", alpaca_records(3, seed=5))
    v2 = write_jsonl(tmp_path / "v2.jsonl", alpaca_records(4, seed=6))
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_records(5, seed=7))
    data = _load(tmp_path, tok, [SourceSpec("a", str(a), "alpaca")],
                 val=[SourceSpec("math", str(v1), "alpaca"), SourceSpec("code", str(v2), "alpaca")])
    assert data.names == ("a",) and data.val_names == ("math", "code")
    assert data.val["source"] == [0, 0, 0, 1, 1, 1, 1]
    assert set(data.dropped) == {"a", "val:math", "val:code"}


# ---------------------------------------------------------------- caching


def _count_tokenizer_calls(monkeypatch):
    calls = {"n": 0}
    for name in ("__call__", "apply_chat_template"):
        original = getattr(PreTrainedTokenizerFast, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(PreTrainedTokenizerFast, name, counted)
    return calls


def test_second_load_uses_cache_and_changes_invalidate_it(tmp_path, monkeypatch):
    tok = make_char_tokenizer(CHAT_TEMPLATE)
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(10, seed=2))
    spec = [SourceSpec("a", str(path), "alpaca")]
    calls = _count_tokenizer_calls(monkeypatch)
    first = _load(tmp_path, tok, spec)
    assert calls["n"] > 0  # the counter does see tokenisation
    calls["n"] = 0
    second = _load(tmp_path, tok, spec)
    assert calls["n"] == 0
    assert _rows(second.train[0]) == _rows(first.train[0]) and second.dropped == first.dropped
    assert second.train[0].cache_files  # memory-mapped from the Arrow cache
    _load(tmp_path, tok, spec, max_length=50)
    assert calls["n"] > 0  # another max_length is another cache
    calls["n"] = 0
    write_jsonl(path, alpaca_records(11, seed=2))
    changed = _load(tmp_path, tok, spec)
    assert calls["n"] > 0 and len(changed.train[0]) == 11
    calls["n"] = 0
    _load(tmp_path, make_char_tokenizer(), spec)  # no chat template: other rendering
    assert calls["n"] > 0


# ---------------------------------------------------------------- errors


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("name, text, fmt, expect", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": oops}\n', "alpaca",
     "bad.jsonl:3: malformed JSON line"),
    ("miss.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "alpaca",
     "miss.jsonl:2: missing field 'output'"),
    ("role.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}\n', "sharegpt",
     "role.jsonl:1: field 'conversations[0].from' must be one of"),
    ("type.jsonl", '{"messages": [{"role": "user", "content": 3}]}\n', "messages",
     "type.jsonl:1: field 'messages[0].content' must be a string"),
    ("empty.jsonl", "\n", "alpaca", "is empty"),
    ("obj.json", '{\n "data": []\n}\n', "alpaca", "obj.json:1: malformed JSON line"),
    ("list.json", '[{"instruction": "a", "output": "b"}, 7]', "alpaca",
     "list.json: record 1: a record must be an object"),
    ("data.txt", "hello\n", "alpaca", "unsupported file type '.txt'"),
])
def test_bad_files_raise_naming_file_and_line(tmp_path, name, text, fmt, expect):
    spec = SourceSpec("s", _write(tmp_path, name, text), fmt)
    with pytest.raises(DataError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        _load(tmp_path, make_char_tokenizer(), [spec])


def test_bad_specs_raise(tmp_path):
    tok = make_char_tokenizer()
    ok = _write(tmp_path, "a.jsonl", json.dumps(ALPACA[0]) + "\n")
    with pytest.raises(DataError, match="unknown format 'csv'"):
        SourceSpec("a", ok, "csv")
    with pytest.raises(DataError, match="no such file or folder"):
        _load(tmp_path, tok, [SourceSpec("a", str(tmp_path / "nope.jsonl"), "alpaca")])
    with pytest.raises(DataError, match="train: duplicate source name 'a'"):
        _load(tmp_path, tok, [SourceSpec("a", ok, "alpaca"), SourceSpec("a", ok, "alpaca")])
    with pytest.raises(DataError, match="val: a non-empty list"):
        load_sources([SourceSpec("a", ok, "alpaca")], [], tok, 64, tmp_path / "c")
    with pytest.raises(DataError, match="max_length"):
        _load(tmp_path, tok, [SourceSpec("a", ok, "alpaca")], max_length=1)
    os.mkdir(tmp_path / "plain_folder")
    with pytest.raises(DataError, match="save_to_disk folder"):
        _load(tmp_path, tok, [SourceSpec("a", str(tmp_path / "plain_folder"), "alpaca")])


def test_source_without_usable_example_raises(tmp_path):
    long_prompt = {"instruction": "a" * 80, "output": "b"}
    path = write_jsonl(tmp_path / "long.jsonl", [long_prompt, long_prompt])
    with pytest.raises(DataError, match=r"long.jsonl: source 'l' has no usable example: all 2"):
        _load(tmp_path, make_char_tokenizer(), [SourceSpec("l", str(path), "alpaca")],
              max_length=20)


def test_template_that_is_not_prefix_stable_raises(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    with pytest.raises(DataError, match=r"s.jsonl:1: the chat template is not prefix-stable"):
        _load(tmp_path, make_char_tokenizer(UNSTABLE_TEMPLATE),
              [SourceSpec("s", str(path), "sharegpt")])
