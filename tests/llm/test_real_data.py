"""The real-text demo's data builder: the derangement has no fixed point, the splits are disjoint,
the counts are those stated, the corrupted copy pairs every problem with another's solution.

Runs on a small fake CHAMP file written here (the builder only needs CHAMP's layout), and once more
on the real package when ``champ-dataset`` is installed."""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest

from scalebio.llm.tasks.real_data import (
    CORRUPTED,
    OFF_TARGET,
    TARGET,
    TEST_NAME,
    VAL_NAME,
    MissingPackageError,
    derangement,
    load_champ,
    solution_text,
    split_ids,
    write_real_sources,
)

N_FAKE, N_VAL, N_TEST = 30, 6, 5


def _fake_champ(path, n=N_FAKE):
    problems = {f"P_{i:03d}": {"_text": f"What is {i} squared?", "_answer": str(i * i),
                               "solution": {"steps": [{"_text": f"Multiply {i} by {i}."},
                                                      {"_text": f"So it is {i * i}."}]}}
                for i in range(n)}
    path.write_text(json.dumps({"problems": problems}), encoding="utf-8")
    return path


def _read(entry):
    with open(entry["path"], encoding="utf-8") as handle:
        return [json.loads(line)["messages"] for line in handle]


def _prompt(messages):
    return next(m["content"] for m in messages if m["role"] == "user")


def _response(messages):
    return next(m["content"] for m in messages if m["role"] == "assistant")


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_derangement_has_no_fixed_point_and_is_a_permutation(n):
    for seed in range(20):
        perm = derangement(n, np.random.default_rng(seed))
        assert sorted(perm.tolist()) == list(range(n))
        assert not np.any(perm == np.arange(n)), (n, seed, perm)


def test_derangement_is_uniform_over_the_two_of_three():
    """n = 3 has exactly two derangements, (1, 2, 0) and (2, 0, 1); rejection sampling must give
    each about half the time. 4000 draws: a binomial standard deviation of ~0.008, so a band of
    0.05 is > 6 sigmas."""
    rng = np.random.default_rng(0)
    draws = [tuple(derangement(3, rng).tolist()) for _ in range(4000)]
    assert set(draws) == {(1, 2, 0), (2, 0, 1)}
    assert abs(draws.count((1, 2, 0)) / len(draws) - 0.5) < 0.05


def test_split_is_disjoint_and_complete():
    train, val, test = split_ids(40, 7, 9, np.random.default_rng(3))
    assert (len(train), len(val), len(test)) == (24, 7, 9)
    assert sorted(train + val + test) == list(range(40))
    with pytest.raises(ValueError, match="cannot split"):
        split_ids(10, 5, 4, np.random.default_rng(0))


def test_sources_from_a_fake_champ_file(tmp_path):
    champ = _fake_champ(tmp_path / "champ.json")
    d = write_real_sources(tmp_path / "data", seed=4, n_val=N_VAL, n_test=N_TEST,
                           champ_file=champ)
    n_train = N_FAKE - N_VAL - N_TEST
    assert d["counts"] == {TARGET: n_train, CORRUPTED: n_train, "prose": n_train,
                           "code": n_train, VAL_NAME: N_VAL, TEST_NAME: N_TEST}
    ids = d["ids"]
    assert not (set(ids["train"]) & set(ids["val"]) or set(ids["train"]) & set(ids["test"])
                or set(ids["val"]) & set(ids["test"]))
    files = {e["name"]: _read(e) for e in [*d["sources"], d["val"], d["test"]]}
    assert {n: len(r) for n, r in files.items()} == d["counts"]
    assert [e["name"] for e in d["sources"]] == [TARGET, CORRUPTED, *OFF_TARGET]
    # every problem's number, read back from its prompt and from the answer line of its response
    def number(text):
        return int(text.split("What is ")[1].split(" ")[0])

    for name in (TARGET, VAL_NAME, TEST_NAME):
        for m in files[name]:
            assert _response(m).endswith(f"Answer: {number(_prompt(m)) ** 2}"), m
    prompts = [_prompt(m) for m in files[TARGET]]
    assert [_prompt(m) for m in files[CORRUPTED]] == prompts  # same problems, same order
    wrong = [_response(m) for m in files[CORRUPTED]]
    right = [_response(m) for m in files[TARGET]]
    assert sorted(wrong) == sorted(right)  # the same solutions, re-paired ...
    assert all(w != r for w, r in zip(wrong, right))  # ... none with its own problem
    assert [right.index(w) for w in wrong] == d["derangement"]
    # the validation/test problems never appear in training
    held = {_prompt(m) for m in files[VAL_NAME] + files[TEST_NAME]}
    assert not held & set(prompts)
    again = write_real_sources(tmp_path / "again", seed=4, n_val=N_VAL, n_test=N_TEST,
                               champ_file=champ)
    for a, b in zip(d["sources"], again["sources"]):
        with open(a["path"], "rb") as fa, open(b["path"], "rb") as fb:
            assert fa.read() == fb.read(), a["name"]  # a seed fixes every byte


def test_solution_keeps_whole_steps_within_the_limit():
    row = {"steps": ["a" * 50, "b" * 50, "c" * 50], "answer": "7"}
    assert solution_text(row, limit=120) == f"{'a' * 50} {'b' * 50}\nAnswer: 7"
    long = {"steps": ["word " * 100], "answer": "x"}
    head = solution_text(long, limit=40).split("\n")[0]
    assert head.endswith(" ...") and len(head) <= 40 + len(" ...")


def test_bad_champ_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"problems": {"P_1": {"text": "no _text field"}}}))
    with pytest.raises(ValueError, match="bad.json.*CHAMP layout"):
        load_champ(bad)


def test_missing_package_names_the_pip_command(monkeypatch):
    import scalebio.llm.tasks.real_data as real_data

    monkeypatch.setattr(real_data, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match="pip install champ-dataset"):
        real_data.champ_path()


@pytest.mark.skipif(find_spec("champ_dataset") is None, reason="needs pip install champ-dataset")
def test_real_champ_counts(tmp_path):
    """The shipped dataset: 270 problems -> 170 train, 50 val, 50 test."""
    d = write_real_sources(tmp_path, seed=0)
    assert d["counts"] == {TARGET: 170, CORRUPTED: 170, "prose": 170, "code": 170,
                           VAL_NAME: 50, TEST_NAME: 50}
    assert len(set(d["ids"]["train"]) | set(d["ids"]["val"]) | set(d["ids"]["test"])) == 270


def test_real_summary_reads_roles_not_names():
    from scalebio.llm.tasks.demo import summarize_real

    roles = {"a": "off-target", "t": "target", "c": "corrupted"}
    assert summarize_real({"a": 0.2, "t": 0.5, "c": 0.3}, roles) == {
        "target_highest": True, "corrupted_below_target": True, "clean_highest": True}
    s = summarize_real({"a": 0.5, "t": 0.2, "c": 0.3}, roles)
    assert not s["target_highest"] and not s["corrupted_below_target"]
