"""`scalebio mix`: Hamilton counts, seeded draws (with/without replacement, capped), byte-identical
reruns, atomic outputs, every refusal, and snippets that parse and load."""

from __future__ import annotations

import ast
import json
import logging
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from scalebio.cli import main as cli_main
from scalebio.llm.data.conversations import to_messages
from scalebio.llm.data.sources import DataError
from scalebio.llm.pipeline import mix_outputs
from scalebio.llm.pipeline.mix import MixError, hamilton_counts, mix

SIZES = {"alpha": 50, "beta": 30, "gamma": 8}  # records per source; 88 in all
WEIGHTS = {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}


def _records(name: str, fmt: str, n: int) -> list[dict]:
    """n distinct records of one format (record i's texts contain the source name and i)."""
    if fmt == "alpaca":
        return [{"instruction": f"{name} q{i}", "input": "x" if i % 2 else "",
                 "output": f"{name} a{i}"} for i in range(n)]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": f"{name} q{i}"},
                                   {"from": "gpt", "value": f"{name} a{i}"}]} for i in range(n)]
    return [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"{name} q{i}"},
                          {"role": "assistant", "content": f"{name} a{i}"}]} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three sources (alpaca .jsonl, sharegpt .json list, messages .jsonl) and a weights.json
    whose stored config lists them; returns (folder, {name: expected messages per record})."""
    d = tmp_path_factory.mktemp("mixdata")
    entries, expected = [], {}
    for (name, n), fmt, file in zip(SIZES.items(), ("alpaca", "sharegpt", "messages"),
                                    ("alpha.jsonl", "beta.json", "gamma.jsonl")):
        recs = _records(name, fmt, n)
        text = (json.dumps(recs) if file.endswith(".json")
                else "".join(json.dumps(r) + "\n" for r in recs))
        (d / file).write_text(text)
        entries.append({"name": name, "path": str(d / file), "format": fmt})
        expected[name] = [to_messages(r, fmt, "test") for r in recs]
    _weights_file(d / "weights.json", WEIGHTS, {"data": {"sources": entries}})
    return d, expected


def _weights_file(path: Path, weights: dict, config: dict | None, averaged: dict | None = None):
    doc = {"weights": weights, "averaged_weights": averaged or weights, "names": list(weights)}
    if config is not None:
        doc["config"] = config
    path.write_text(json.dumps(doc))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "mixture.jsonl").read_text().splitlines()]


def _run(data, out: Path, n: int, **kw) -> dict:
    return mix(data[0] / "weights.json", out, n, progress=False, **kw)


# ---------------------------------------------------------------- counts


def test_hamilton_hand_examples():
    # quotas 3.5, 2.1, 1.4 → floors 3, 2, 1 (6) → the one seat left goes to remainder 0.5
    assert hamilton_counts([0.5, 0.3, 0.2], 7) == [4, 2, 1]
    # equal remainders: the seats go to the earlier sources
    assert hamilton_counts([1 / 3, 1 / 3, 1 / 3], 4) == [2, 1, 1]
    assert hamilton_counts([1 / 3, 1 / 3, 1 / 3], 5) == [2, 2, 1]
    assert hamilton_counts([0.0, 1.0], 3) == [0, 3]


@settings(derandomize=True, deadline=None, max_examples=200)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=8).filter(any),
       st.integers(0, 500))
def test_hamilton_characterisation(raw, total):
    """Hamilton with ties to the earlier source ⇔ sum = N, each count is ⌊q⌋ or ⌊q⌋+1, and
    every rounded-up source beats every rounded-down one on (remainder, earlier index)."""
    weights = [r / sum(raw) for r in raw]
    counts = hamilton_counts(weights, total)
    norm = sum(Fraction(w) for w in weights)
    quotas = [total * Fraction(w) / norm for w in weights]
    assert sum(counts) == total
    floors = [q.numerator // q.denominator for q in quotas]
    assert all(c - f in (0, 1) for c, f in zip(counts, floors))
    up = [i for i, (c, f) in enumerate(zip(counts, floors)) if c > f]
    down = [i for i, (c, f) in enumerate(zip(counts, floors)) if c == f]
    for i in up:
        for j in down:
            ri, rj = quotas[i] - floors[i], quotas[j] - floors[j]
            assert ri > rj or (ri == rj and i < j)


# ---------------------------------------------------------------- draws


def test_exact_counts_no_duplicates_and_dataset(data, tmp_path):
    from datasets import load_from_disk

    manifest = _run(data, tmp_path / "out", 40)  # 20/12/8: every source has enough
    rows = _rows(tmp_path / "out")
    assert len(rows) == 40 == manifest["num_examples_written"]
    assert Counter(r["source"] for r in rows) == {"alpha": 20, "beta": 12, "gamma": 8}
    keys = [json.dumps(r, sort_keys=True) for r in rows]
    assert len(set(keys)) == len(keys)  # without replacement
    for r in rows:  # every row is a real record of its source, in messages format
        assert r["messages"] in data[1][r["source"]]
    assert [s["requested"] for s in manifest["sources"]] == [20, 12, 8]
    assert [s["taken"] for s in manifest["sources"]] == [20, 12, 8]
    assert load_from_disk(str(tmp_path / "out" / "dataset")).to_list() == rows
    assert len({r["source"] for r in rows[:10]}) > 1  # shuffled, not in source blocks


def _held_out(out: Path, manifest: dict, name: str) -> list[dict]:
    entry = manifest["held_out"][name]
    lines = (out / entry["path"]).read_text().splitlines()
    assert len(lines) == entry["records"]
    return [json.loads(line)["messages"] for line in lines]


def test_held_out_is_the_complement_in_file_order(data, tmp_path):
    manifest = _run(data, tmp_path / "out", 40)  # 20/12/8 of 50/30/8
    rows = _rows(tmp_path / "out")
    for name, records in data[1].items():
        taken = [r["messages"] for r in rows if r["source"] == name]
        held = _held_out(tmp_path / "out", manifest, name)
        # disjoint, together every record exactly once, held-out rows in file order
        assert sorted(map(json.dumps, taken + held)) == sorted(map(json.dumps, records))
        assert held == [m for m in records if m not in taken]
    assert manifest["held_out"]["gamma"]["records"] == 0  # all 8 of gamma are in the mixture


def test_upsample_takes_every_record_then_repeats(data, tmp_path):
    manifest = _run(data, tmp_path / "out", 100)  # gamma: 20 requested of 8
    rows = _rows(tmp_path / "out")
    assert len(rows) == 100
    by_source = Counter(r["source"] for r in rows)
    assert by_source == {"alpha": 50, "beta": 30, "gamma": 20}
    gamma = Counter(json.dumps(r["messages"]) for r in rows if r["source"] == "gamma")
    assert len(gamma) == 8 and min(gamma.values()) >= 1  # every record at least once
    alpha = [json.dumps(r["messages"]) for r in rows if r["source"] == "alpha"]
    assert len(set(alpha)) == 50  # count == size: all of alpha, each once
    g = manifest["sources"][2]
    assert (g["requested"], g["taken"], g["distinct"], g["shortfall"]) == (20, 20, 8, 0)


def test_cap_takes_every_record_once_and_logs(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="scalebio.llm.pipeline.mix"):
        manifest = _run(data, tmp_path / "out", 80, when_short="cap")  # 40/24/16; gamma has 8
    rows = _rows(tmp_path / "out")
    # the shortfall is not redistributed: alpha and beta keep exactly their Hamilton counts
    assert Counter(r["source"] for r in rows) == {"alpha": 40, "beta": 24, "gamma": 8}
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == 72  # no repeats
    assert manifest["num_examples_written"] == 72 and manifest["num_examples_requested"] == 80
    assert manifest["sources"][2]["shortfall"] == 8 and manifest["when_short"] == "cap"
    assert "'gamma'" in caplog.text and "capped" in caplog.text


def test_cap_refuses_more_than_all_data(data, tmp_path):
    with pytest.raises(MixError, match="hold only 88 records"):
        _run(data, tmp_path / "out", 89, when_short="cap")
    assert not (tmp_path / "out").exists()
    assert len(_rows(_out_after(data, tmp_path / "up", 89))) == 89  # upsample reaches N


def _out_after(data, out: Path, n: int) -> Path:
    _run(data, out, n)
    return out


def test_averaged_weights_are_used(data, tmp_path):
    d = data[0]
    cfg = json.loads((d / "weights.json").read_text())["config"]
    w = _weights_file(tmp_path / "w.json", WEIGHTS, cfg, {"alpha": 0.1, "beta": 0.1, "gamma": 0.8})
    manifest = mix(w, tmp_path / "out", 10, averaged=True, progress=False)
    assert [s["requested"] for s in manifest["sources"]] == [1, 1, 8]
    assert manifest["weights_key"] == "averaged_weights"


def test_zero_weight_source_gets_nothing_and_leaves_the_snippets(data, tmp_path):
    cfg = json.loads((data[0] / "weights.json").read_text())["config"]
    w = _weights_file(tmp_path / "w.json", {"alpha": 0.75, "beta": 0.25, "gamma": 0.0}, cfg)
    mix(w, tmp_path / "out", 12, progress=False)
    assert Counter(r["source"] for r in _rows(tmp_path / "out")) == {"alpha": 9, "beta": 3}
    lf = yaml.safe_load((tmp_path / "out/snippets/llamafactory/interleave.yaml").read_text())
    assert lf["dataset"] == "alpha,beta" and lf["interleave_probs"] == "0.75,0.25"


# ---------------------------------------------------------------- determinism and atomicity


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_byte_identical_for_a_seed(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(data, a, 100, seed=7)
    first = _tree(a)
    _run(data, a, 100, seed=7, overwrite=True)
    assert _tree(a) == first
    _run(data, b, 100, seed=7)  # another folder: equal once the folder's own path is swapped
    assert _tree(b) == {k: v.replace(bytes(str(a), "utf-8"), bytes(str(b), "utf-8"))
                        for k, v in first.items()}
    _run(data, tmp_path / "c", 100, seed=8)
    assert (tmp_path / "c/mixture.jsonl").read_bytes() != first["mixture.jsonl"]


def test_existing_output_refused_then_replaced_atomically(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(MixError, match="not empty; pass --overwrite"):
        _run(data, out, 10)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mix_outputs, "render_snippets", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(data, out, 10, overwrite=True)
    assert _tree(out) == {"old.txt": b"keep me"}  # a failed write leaves the old folder alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no temporary folder
    monkeypatch.undo()
    _run(data, out, 10, overwrite=True)
    assert not (out / "old.txt").exists() and len(_rows(out)) == 10
    (tmp_path / "file").write_text("")
    with pytest.raises(MixError, match="not a folder"):
        _run(data, tmp_path / "file", 10)


def test_overwrite_refuses_to_delete_its_inputs(data, tmp_path):
    (tmp_path / "src.jsonl").write_text(json.dumps(_records("s", "alpaca", 3)[0]) + "\n")
    cfg = {"data": {"sources": [{"name": "s", "path": "src.jsonl"}]}}
    _weights_file(tmp_path / "w.json", {"s": 1.0}, cfg)  # relative path: joins the file's folder
    with pytest.raises(MixError, match="would delete inputs"):
        mix(tmp_path / "w.json", tmp_path, 2, overwrite=True, progress=False)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("weights, match", [
    ({"alpha": 0.5, "beta": 0.3, "gamma": 0.1, "delta": 0.1}, r"unknown source\(s\) \['delta'\]"),
    ({"alpha": 0.5, "beta": 0.5}, r"config source\(s\) \['gamma'\] have no weight"),
    ({"alpha": 0.5, "beta": 0.3, "gamma": 0.1}, "sum to 0.9"),
    ({"alpha": 0.5, "beta": 0.5 + 2e-6, "gamma": 0.0}, "not 1"),
    ({"alpha": 1.2, "beta": -0.2, "gamma": 0.0}, "'beta' must be a finite number >= 0"),
    ({"alpha": 0.5, "beta": 0.5, "gamma": "0"}, "'gamma' must be a finite number"),
])
def test_bad_weights_are_refused(data, tmp_path, weights, match):
    cfg = json.loads((data[0] / "weights.json").read_text())["config"]
    w = _weights_file(tmp_path / "w.json", weights, cfg)
    with pytest.raises(MixError, match=match):
        mix(w, tmp_path / "out", 10, progress=False)


def test_weights_within_tolerance_are_accepted(data, tmp_path):
    cfg = json.loads((data[0] / "weights.json").read_text())["config"]
    w = _weights_file(tmp_path / "w.json", {"alpha": 0.5, "beta": 0.3, "gamma": 0.2000005}, cfg)
    assert mix(w, tmp_path / "out", 10, progress=False)["num_examples_written"] == 10


@pytest.mark.parametrize("kwargs, match", [
    ({"num_examples": 0}, "--num-examples: a positive integer"),
    ({"num_examples": -3}, "--num-examples: a positive integer"),
    ({"seed": -1}, "--seed"),
    ({"when_short": "drop"}, "--when-short"),
    ({"config_path": "/nonexistent/c.yaml"}, "--config .*file not found"),
])
def test_bad_arguments_are_refused(data, tmp_path, kwargs, match):
    args = {"num_examples": 10, **kwargs}
    with pytest.raises(MixError, match=match):
        mix(data[0] / "weights.json", tmp_path / "out", progress=False, **args)


def test_bad_weights_files_are_refused(data, tmp_path):
    with pytest.raises(MixError, match="file not found"):
        mix(tmp_path / "none.json", tmp_path / "out", 5)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MixError, match="not valid JSON"):
        mix(tmp_path / "bad.json", tmp_path / "out", 5)
    (tmp_path / "w.json").write_text(json.dumps({"weights": {"alpha": 1.0}}))
    with pytest.raises(MixError, match="no 'averaged_weights'"):
        mix(tmp_path / "w.json", tmp_path / "out", 5, averaged=True)
    with pytest.raises(MixError, match="holds no 'config'; pass --config"):
        mix(tmp_path / "w.json", tmp_path / "out", 5)


def test_config_file_sources(data, tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"sources": [
        {"name": "alpha", "path": str(data[0] / "alpha.jsonl")}]}}))  # format: alpaca default
    _weights_file(tmp_path / "w.json", {"alpha": 1.0}, None)
    mix(tmp_path / "w.json", tmp_path / "out", 5, config_path=tmp_path / "c.yaml", progress=False)
    assert Counter(r["source"] for r in _rows(tmp_path / "out")) == {"alpha": 5}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"sources": [
        {"name": "alpha", "path": "a.jsonl", "weight": 1}]}}))
    with pytest.raises(MixError, match=r"data.sources\[0\]: unknown field\(s\) \['weight'\]"):
        mix(tmp_path / "w.json", tmp_path / "o2", 5, config_path=tmp_path / "c.yaml")


@pytest.mark.parametrize("content, match", [
    (None, "no such file or folder"),
    ("", "is empty"),
    ('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n', r"src.jsonl:2: missing field"),
])
def test_bad_sources_are_refused(tmp_path, content, match):
    if content is not None:
        (tmp_path / "src.jsonl").write_text(content)
    w = _weights_file(tmp_path / "w.json", {"s": 1.0},
                      {"data": {"sources": [{"name": "s", "path": "src.jsonl"}]}})
    with pytest.raises(DataError, match=match):
        mix(w, tmp_path / "out", 1, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- CLI and snippets


def test_cli_writes_and_reports_errors(data, tmp_path, capsys):
    w = str(data[0] / "weights.json")
    assert cli_main(["mix", "--weights", w, "--num-examples", "20", "--out",
                     str(tmp_path / "out"), "--seed", "3", "--no-progress"]) == 0
    assert "20 rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "out/manifest.json").read_text())["seed"] == 3
    assert cli_main(["mix", "--weights", w, "--num-examples", "0", "--out",
                     str(tmp_path / "o2")]) == 2
    assert "--num-examples: a positive integer" in capsys.readouterr().err


def test_snippets_parse_and_load(data, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "out"
    manifest = _run(data, out, 30, seed=5)
    snip = out / "snippets"
    assert sorted(manifest["snippets"]) == sorted(
        str(p.relative_to(snip)) for p in snip.rglob("*") if p.is_file())
    info = json.loads((snip / "llamafactory/dataset_info.json").read_text())
    assert info["scalebio_mixture"]["file_name"] == str(out / "mixture.jsonl")
    assert info["beta"]["columns"] == {"messages": "conversations"}
    lf = yaml.safe_load((snip / "llamafactory/interleave.yaml").read_text())
    assert lf["dataset"] == "alpha,beta,gamma" and lf["mix_strategy"] == "interleave_over"
    assert [float(p) for p in lf["interleave_probs"].split(",")] == list(WEIGHTS.values())
    assert yaml.safe_load((snip / "llamafactory/mixture.yaml").read_text())["dataset"] == (
        "scalebio_mixture")
    ax = yaml.safe_load((snip / "axolotl.yaml").read_text())["datasets"][0]
    assert ax["path"] == str(out / "mixture.jsonl") and ax["type"] == "chat_template"
    code = (snip / "trl_sft.py").read_text()
    ast.parse(code)
    namespace: dict = {}
    exec(compile(code, "trl_sft.py", "exec"), namespace)  # noqa: S102 (our own generated file)
    assert namespace["train_dataset"].to_list() == [
        {"messages": r["messages"]} for r in _rows(out)]
    mixed = namespace["interleaved"](seed=0, stopping_strategy="first_exhausted")
    assert mixed.column_names == ["messages"] and len(mixed) > 0
    for m in mixed["messages"]:
        assert any(m in records for records in data[1].values())


def test_publish_never_replaces_content_without_overwrite(tmp_path):
    """The last step is one rename: a folder that gained files meanwhile makes it fail."""
    staged, out = tmp_path / "staged", tmp_path / "out"
    staged.mkdir()
    (staged / "new.txt").write_text("new")
    out.mkdir()
    (out / "late.txt").write_text("late")
    with pytest.raises(OSError):
        mix_outputs.publish(staged, out, overwrite=False)
    assert _tree(out) == {"late.txt": b"late"}
    (out / "late.txt").unlink()  # an empty folder is replaced
    mix_outputs.publish(staged, out, overwrite=False)
    assert _tree(out) == {"new.txt": b"new"}
