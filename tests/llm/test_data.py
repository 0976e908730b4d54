"""llm/data/sources.py: formats, response-only labels, truncation, containers, caching, clear
errors."""

from __future__ import annotations

import json
import logging
import os
import tracemalloc
from pathlib import Path

import numpy as np
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
    random_words,
    write_jsonl,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from scalebio.llm.data import conversations, sources
from scalebio.llm.data.conversations import render, to_messages
from scalebio.llm.data.sources import DataError, SourceSpec, load_sources
from scalebio.llm.data.tokenizer import bpe_tokenizer

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
    # one process: worker start-up would dominate these small files (parallel: tested below)
    return load_sources(train, val, tok, max_length, tmp_path / "cache", num_proc=1)


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


@pytest.mark.parametrize("small_buffers", [False, True])
def test_containers_give_identical_tokens(tmp_path, monkeypatch, small_buffers):
    if small_buffers:  # records straddle reads of a JSON list, parquet batches and chunks
        monkeypatch.setattr(sources, "_BLOCK", 5)
        monkeypatch.setattr(sources, "_ROWS", 3)
        monkeypatch.setattr(sources, "CHUNK_RECORDS", 4)
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
    """Counts the tokenizer's reference calls and the chunks tokenised in this process (the
    shortcuts of conversations.Encoder bypass the former)."""
    calls = {"n": 0}
    for owner, name in [(PreTrainedTokenizerFast, "__call__"),
                        (PreTrainedTokenizerFast, "apply_chat_template"),
                        (sources, "_tokenise_chunk")]:
        original = getattr(owner, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
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
    with pytest.raises(DataError, match="num_proc: a positive integer"):
        load_sources([SourceSpec("a", ok, "alpaca")], [SourceSpec("a", ok, "alpaca")], tok, 64,
                     tmp_path / "c", num_proc=0)
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


# ---------------------------------------------------------------- streaming, chunks, processes


def _sharegpt_records(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        turns = [{"from": "system", "value": random_words(rng, 3)}] if rng.random() < 0.3 else []
        for _ in range(int(rng.integers(1, 4))):
            turns += [{"from": "human", "value": random_words(rng, int(rng.integers(1, 8)))},
                      {"from": "gpt", "value": random_words(rng, int(rng.integers(1, 8)))}]
        out.append({"conversations": turns})
    return out


def _lcp(a, b):
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _reference(tok, records, fmt, max_length):
    """Per record through the tokenizer's own calls (apply_chat_template or the plain template,
    then tokenizer(text)) and the common-prefix rule of llm/data/conversations.py: the
    tokenisation before streaming, chunking and the Encoder shortcuts.
    Returns (rows, dropped, boundaries inside a token)."""
    rows, dropped, inexact = [], 0, 0
    for i, record in enumerate(records):
        msgs = to_messages(record, fmt, str(i))

        def ids(m, gen):
            return tok(render(tok, m, gen), add_special_tokens=False)["input_ids"]

        whole = ids(msgs, False)
        labels = [-100] * len(whole)
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt, turn = ids(msgs[:k], True), ids(msgs[: k + 1], False)
                start, end = _lcp(whole, prompt), _lcp(whole, turn)
                inexact += (start < len(prompt)) + (end < len(turn))
                labels[start:end] = whole[start:end]
        if any(y != -100 for y in labels[1:max_length]):
            rows.append((whole[:max_length], labels[:max_length]))
        else:
            dropped += 1
    return rows, dropped, inexact


@pytest.fixture(scope="module")
def bpe():
    rng = np.random.default_rng(0)
    return bpe_tokenizer([random_words(rng, 30) for _ in range(300)], vocab_size=300)


@pytest.mark.parametrize("tokenizer", ["bpe", "char-template", "char-plain", "char-merge"])
@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt"])
def test_chunked_tokenisation_equals_per_record_reference(tmp_path, monkeypatch, bpe, tokenizer,
                                                          fmt, caplog):
    monkeypatch.setattr(sources, "CHUNK_RECORDS", 7)  # 60 records: 9 chunks, the last short
    tok = {"bpe": bpe, "char-template": make_char_tokenizer(CHAT_TEMPLATE),
           "char-plain": make_char_tokenizer(),
           "char-merge": make_char_tokenizer(merges=[("\n", "a"), ("a", "b")])}[tokenizer]
    records = alpaca_records(60, seed=4, max_words=10) if fmt == "alpaca" else _sharegpt_records(
        60, seed=4)
    max_length = 40  # some examples lose every response token: the dropping path runs too
    rows, dropped, inexact = _reference(tok, records, fmt, max_length)
    assert 0 < dropped < len(records)
    path = write_jsonl(tmp_path / "a.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="scalebio.llm.data.sources"):
        data = _load(tmp_path, tok, [SourceSpec("a", str(path), fmt)], max_length=max_length)
    assert _rows(data.train[0]) == rows
    assert data.train[0]["n_target"] == [sum(y != -100 for y in lab[1:]) for _, lab in rows]
    assert data.dropped["a"] == dropped
    assert f"source 'a': dropped {dropped} of 60 examples" in caplog.text
    assert (f"{inexact} response boundaries fall inside a token" in caplog.text) == (inexact > 0)
    if tokenizer == "char-merge":
        assert inexact > 0


@pytest.mark.parametrize("tokenizer", ["bpe", "char-template", "char-plain"])
def test_encoder_shortcuts_are_used_and_exact_for_every_text(bpe, tokenizer):
    tok = {"bpe": bpe, "char-template": make_char_tokenizer(CHAT_TEMPLATE),
           "char-plain": make_char_tokenizer()}[tokenizer]
    encoder = conversations.Encoder(tok)
    messages = [to_messages(r, "sharegpt", str(i)) for i, r in enumerate(_sharegpt_records(30, 5))]
    conversations.tokenise_examples(encoder, messages, ["x"] * 30, 64)  # runs the check
    assert encoder.fallbacks == [] and encoder._anchors  # prefixes are cut at special tokens
    rendered = [conversations._render_example(encoder.render, m, "x") for m in messages]
    assert rendered == [[render(tok, m[:k], g) for k, g in _prefixes(m)] for m in messages]
    assert encoder.encode_examples(rendered) == [
        [tok(t, add_special_tokens=False)["input_ids"] for t in texts] for texts in rendered]


def _prefixes(messages):
    """(message count, generation prompt) of [whole, prompt_1, turn_1, ...]."""
    out = [(len(messages), False)]
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            out += [(k, True), (k + 1, False)]
    return out


def _metaspace_tokenizer():
    """A tokenizer that marks only the start of the input with "▁": text after a special token
    tokenises differently alone than in context, so cutting prefixes there is wrong."""
    rng = np.random.default_rng(0)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    backend.train_from_iterator([random_words(rng, 20) for _ in range(200)], trainers.BpeTrainer(
        vocab_size=200, special_tokens=specials, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=specials[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("shortcut", ["chat template", "prefix anchors"])
def test_encoder_shortcut_that_differs_is_dropped(tmp_path, monkeypatch, caplog, shortcut):
    """A shortcut that differs from the reference calls is detected on a chunk's first example
    and replaced by the reference call: tokens stay the reference's."""
    if shortcut == "chat template":  # a rendering that differs from apply_chat_template
        tok = make_char_tokenizer(CHAT_TEMPLATE)
        original = conversations.Encoder.render

        def wrong(self, messages, generation_prompt):
            text = original(self, messages, generation_prompt)
            return text if self._template is None else text.replace("a", "b")

        monkeypatch.setattr(conversations.Encoder, "render", wrong)
    else:
        tok = _metaspace_tokenizer()
    records = alpaca_records(20, seed=8)
    path = write_jsonl(tmp_path / "a.jsonl", records)
    with caplog.at_level(logging.INFO, logger="scalebio.llm.data.sources"):
        data = _load(tmp_path, tok, [SourceSpec("a", str(path), "alpaca")])
    assert _rows(data.train[0]) == _reference(tok, records, "alpaca", 64)[0]
    assert f"{shortcut} differed from the reference call" in caplog.text


def test_parallel_equals_serial_and_keeps_line_numbers(tmp_path, monkeypatch, bpe):
    monkeypatch.setattr(sources, "CHUNK_RECORDS", 16)  # chunking happens in this process
    calls = _count_tokenizer_calls(monkeypatch)
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_records(150, seed=9))
    s = write_jsonl(tmp_path / "s.jsonl", _sharegpt_records(70, seed=9))
    specs = [SourceSpec("a", str(a), "alpaca"), SourceSpec("s", str(s), "sharegpt")]
    runs = {}
    for n in (1, 2):
        calls["n"] = 0
        runs[n] = load_sources(specs, specs[:1], bpe, 48, tmp_path / f"cache{n}", num_proc=n)
        assert (calls["n"] == 0) == (n == 2)  # with 2, every chunk was tokenised by a worker
    for serial, parallel in zip(runs[1].train, runs[2].train):
        assert _rows(parallel) == _rows(serial) and parallel["n_target"] == serial["n_target"]
    assert runs[2].dropped == runs[1].dropped and runs[1].dropped["s"] > 0
    lines = a.read_text().splitlines()
    lines[99] = '{"instruction": "x", "output": }'  # line 100: the 7th chunk of 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:100: malformed JSON line"):
        load_sources([SourceSpec("b", str(bad), "alpaca")], specs[:1], bpe, 48,
                     tmp_path / "cache3", num_proc=2)


def _big(tmp_path, name, records, line, text):
    lines = [json.dumps(r) for r in records]
    lines[line - 1] = text
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return str(tmp_path / name)


def test_errors_in_the_middle_of_a_big_file_name_their_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_RECORDS", 64)
    monkeypatch.setattr(sources, "_BLOCK", 1000)  # the JSON list is read in many pieces
    tok, records = make_char_tokenizer(), alpaca_records(1500, seed=10)
    cases = [
        (_big(tmp_path, "a.jsonl", records, 777, '{"instruction": "a", "output": "b"'),
         "a.jsonl:777: malformed JSON line"),
        (_big(tmp_path, "b.jsonl", records, 1000, '{"instruction": "a"}'),
         "b.jsonl:1000: missing field 'output'"),
        # a list with one record per line: line k holds record k - 2 ("[" is line 1)
        (_big(tmp_path, "c.json", [[]] + records + [[]], 903, '{"instruction": 1, "output": "b"}'),
         "c.json: record 901: field 'instruction' must be a string"),
        (_big(tmp_path, "d.json", [[]] + records + [[]], 1203, '{"instruction": "a" "output"}'),
         r"d.json:1203: malformed JSON \(Expecting ',' delimiter\)"),
        # an earlier bad record is reported before a later syntax error of the list
        (_big(tmp_path, "e.json", [[]] + records + [[]], 1203, '{"x": '),
         "e.json: record 1: missing field 'instruction'"),
    ]
    for path, expect in cases:
        if path.endswith(".json"):  # make it one JSON list, one record per line
            lines = Path(path).read_text().splitlines()
            lines[0], lines[-1] = "[", "]"
            lines[1:-2] = [ln + "," for ln in lines[1:-2]]
            if "e.json" in path:
                lines[2] = '{"output": "b"},'
            Path(path).write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=expect):
            load_sources([SourceSpec("x", path, "alpaca")], [SourceSpec("x", path, "alpaca")],
                         tok, 64, tmp_path / "cache", num_proc=1)


@pytest.mark.parametrize("text", [
    '[1234567, {"a": [1, "x]"]}, "y\\"z", 3.5e10, true, null, "\\u00e9"]',
    ' \n[\n]\n', '[{"a": "' + "é" * 40 + '"},\n\n {"b": -0.5}]',
])
def test_json_list_reader_parses_like_json_loads(tmp_path, monkeypatch, text):
    monkeypatch.setattr(sources, "_BLOCK", 3)  # every value is cut by a read: "cut" numbers too
    path = tmp_path / "l.json"
    path.write_text(text, encoding="utf-8")
    assert list(sources._json_list(path)) == json.loads(text)


@pytest.mark.parametrize("text, line", [
    ("[1,\n2,\n]", 3), ("[1\n 2]", 2), ("[1, 2]\n\nx", 3), ("[1,\n[2", 2), ("[{\n}", 2),
])
def test_json_list_reader_errors_name_the_line(tmp_path, monkeypatch, text, line):
    monkeypatch.setattr(sources, "_BLOCK", 2)
    path = tmp_path / "l.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"l.json:{line}: malformed JSON"):
        list(sources._json_list(path))


def test_peak_memory_does_not_grow_with_file_size(tmp_path, monkeypatch, bpe):
    """Python memory at the peak of a cold load, for N and 4N records (one process).

    A loader that holds a file's records grows by at least what the records take as Python
    objects (``held``). The streamed loader holds one chunk (and its tokens) at a time, so its
    peak grows only by per-chunk bookkeeping of the Arrow file, a few hundred bytes per chunk of
    32 records here (per 1024 by default): bound the growth at 10% of ``held``'s growth (the
    loader before streaming exceeded 100%). tracemalloc sees Python and numpy allocations, not
    Arrow's or the Rust tokenizer's, which are bounded per chunk by the same design."""
    monkeypatch.setattr(sources, "CHUNK_RECORDS", 32)
    val = [SourceSpec("v", str(write_jsonl(tmp_path / "v.jsonl", ALPACA)), "alpaca")]

    def measure(n):
        path = write_jsonl(tmp_path / f"a{n}.jsonl", alpaca_records(n, seed=n, max_words=12))
        tracemalloc.start()
        load_sources([SourceSpec("a", str(path), "alpaca")], val, bpe, 256,
                     tmp_path / f"cache{n}", num_proc=1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        tracemalloc.start()
        records = [json.loads(line) for line in path.read_text().splitlines()]
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del records
        return peak, held

    measure(40)  # warm-up: one-off allocations (template compilation, imports) are not growth
    (peak_n, held_n), (peak_4n, held_4n) = measure(400), measure(1600)
    assert peak_4n - peak_n < 0.10 * (held_4n - held_n), (peak_n, peak_4n, held_n, held_4n)
