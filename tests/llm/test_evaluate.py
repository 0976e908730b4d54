"""`scalebio evaluate`: the loss equals a hand computation, answers are parsed as documented, an
end-to-end run on a briefly trained model writes sane numbers, bad inputs fail clearly."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from test_sft import TINY, demo_files, sft_config, write_mixture

from scalebio.llm.cli import evaluate_main
from scalebio.llm.config_files import config_from_dict
from scalebio.llm.data.tokenizer import CHAR_SPECIAL_TOKENS, char_tokenizer, char_vocab
from scalebio.llm.model import load_model
from scalebio.llm.outputs import OutputError
from scalebio.llm.pipeline.evaluate import evaluate, first_number, format_table, reference_number
from scalebio.llm.pipeline.sft import sft

# Batched right-padded float32 forwards vs one unpadded float64-softmax forward per example:
# the same math in another summation order, so agreement to float32 rounding.
HAND_RTOL = 1e-5


@pytest.mark.parametrize("text, expected", [
    ("95", Decimal(95)), ("The answer is 1,234.", Decimal(1234)), ("-7 then 8", Decimal(-7)),
    ("x=3.50!", Decimal("3.5")), ("no digits", None), ("", None), ("12,34", Decimal(12)),
])
def test_first_number(text, expected):
    assert first_number(text) == expected


@pytest.mark.parametrize("answer, expected", [
    ("95", Decimal(95)), (" 95 \n", Decimal(95)), ("steps... #### 72", Decimal(72)),
    ("a #### b #### 1,000", Decimal(1000)), ("95 apples", None), ("abc", None),
    ("#### none", None), ("3.0", Decimal(3)),
])
def test_reference_number(answer, expected):
    assert reference_number(answer) == expected


def test_numbers_compare_as_decimals():
    assert first_number("95.0") == reference_number("95")
    assert first_number("950") != reference_number("95")


def _save_fixed_model(folder: Path) -> None:
    model = load_model(config=TINY, seed=7)
    model.save_pretrained(str(folder))
    char_tokenizer().save_pretrained(str(folder))


def _hand_loss(model_dir: Path, pairs: list[tuple[str, str]]) -> float:
    """Σ CE over response tokens (answer + </s>) / their count, written out for the char template
    <s><|user|>prompt<|assistant|>answer</s>, one unpadded example at a time."""
    vocab = char_vocab()
    bos, eos, user, assistant = (vocab[t] for t in ("<s>", "</s>", "<|user|>", "<|assistant|>"))
    assert CHAR_SPECIAL_TOKENS[1:3] == ("<s>", "</s>")
    model = load_model(path=str(model_dir)).eval()
    total, count = 0.0, 0
    for prompt, answer in pairs:
        head = [bos, user] + [vocab[c] for c in prompt] + [assistant]
        target = [vocab[c] for c in answer] + [eos]
        ids = torch.tensor([head + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for j, tok in enumerate(target):
            total -= float(logp[len(head) + j - 1, tok])
        count += len(target)
    return total / count


def _pairs(path: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [(r["instruction"], r["output"]) for r in rows]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return demo_files(tmp_path_factory.mktemp("evaldata"))


def test_loss_equals_hand_computation(files, tmp_path):
    _save_fixed_model(tmp_path / "model")
    cfg, _ = sft_config(files, tmp_path / "cache")
    doc = evaluate(tmp_path / "model", cfg, tmp_path / "out", max_examples=100, batch_size=3,
                   max_new_tokens=4, progress=False)
    by_name = {s["name"]: s for s in doc["sets"]}
    for spec in files["sources"] + [files["val"]]:
        expected = _hand_loss(tmp_path / "model", _pairs(spec["path"]))
        torch.testing.assert_close(by_name[spec["name"]]["loss"], expected, rtol=HAND_RTOL, atol=0)
    val_only = _hand_loss(tmp_path / "model", _pairs(files["val"]["path"]))
    torch.testing.assert_close(by_name["validation"]["loss"], val_only, rtol=HAND_RTOL, atol=0)


def test_end_to_end_after_sft(files, tmp_path, capsys):
    cfg, raw = sft_config(files, tmp_path / "cache", steps=20)
    mixture = write_mixture(tmp_path / "mixture.jsonl", files["sources"][0]["path"])
    sft(cfg, mixture, tmp_path / "run", progress=False)
    _save_fixed_model(tmp_path / "untrained")  # a different seed's random init, for comparison
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(raw))
    args = ["--config", str(cfg_file), "--max-examples", "6", "--max-new-tokens", "4",
            "--no-progress"]
    assert evaluate_main(["--model", str(tmp_path / "run" / "model"), "--out",
                          str(tmp_path / "ev"), *args]) == 0
    table = capsys.readouterr().out
    doc = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(doc) == {"model", "max_examples", "seed", "max_new_tokens", "held_out", "skipped",
                        "sets"}
    assert doc["held_out"] is None and doc["skipped"] == {}
    assert [(s["name"], s["role"]) for s in doc["sets"]] == [
        ("clean", "source"), ("corrupt50", "source"), ("val_clean", "validation"),
        ("validation", "validation_all")]
    for s in doc["sets"]:
        assert s["name"] in table
        assert 0 < s["loss"] < 10 and s["examples"] == 6 and s["tokens"] >= 6
    clean = doc["sets"][0]
    assert clean["checkable"] == 6 and 0 <= clean["correct"] <= 6  # every clean answer is a number
    assert clean["accuracy"] == clean["correct"] / 6
    corrupt = doc["sets"][1]  # half the corrupted answers are letter junk: not checkable
    assert corrupt["checkable"] < 6
    assert doc["sets"][3]["accuracy"] is None
    assert format_table(doc).splitlines()[0].split()[:3] == ["set", "role", "loss"]
    base = evaluate(tmp_path / "untrained", cfg, tmp_path / "ev0", max_examples=6,
                    max_new_tokens=4, progress=False)
    assert clean["loss"] < base["sets"][0]["loss"]  # 20 steps of sft beat a random init


def test_errors(files, tmp_path, capsys):
    cfg = config_from_dict(sft_config(files, tmp_path / "cache")[1])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate(tmp_path / "nothing", cfg, tmp_path / "out", progress=False)
    _save_fixed_model(tmp_path / "model")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        evaluate(tmp_path / "model", cfg, tmp_path / "busy", progress=False)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(sft_config(files, tmp_path / "cache")[1]))
    assert evaluate_main(["--model", str(tmp_path / "nothing"), "--config", str(cfg_file),
                          "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "no config.json" in capsys.readouterr().err


def _mix_of(files: dict, folder: Path, weights: dict, n: int) -> Path:
    """`scalebio mix` of ``files``' sources with ``weights`` into ``folder/mix``."""
    from scalebio.llm.pipeline.mix import mix

    folder.mkdir(parents=True, exist_ok=True)
    wfile = folder / "weights.json"
    wfile.write_text(json.dumps({"weights": weights, "averaged_weights": weights,
                                 "config": {"data": {"sources": files["sources"]}}}))
    mix(wfile, folder / "mix", n, seed=1, progress=False)
    return folder / "mix"


def _complement(source_file: str, mixture: Path, name: str) -> list[tuple[str, str]]:
    """The source's (prompt, answer) pairs minus the mixture's rows of that source (multiset)."""
    left = _pairs(source_file)
    for line in (mixture / "mixture.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["source"] == name:
            left.remove(tuple(m["content"] for m in row["messages"]))
    return left


def test_held_out_loss_is_the_loss_on_the_undrawn_records(files, tmp_path, capsys):
    _save_fixed_model(tmp_path / "model")
    cfg, raw = sft_config(files, tmp_path / "cache")
    mixture = _mix_of(files, tmp_path, {"clean": 0.25, "corrupt50": 0.75}, 40)  # 10/30 of 40/40
    doc = evaluate(tmp_path / "model", cfg, tmp_path / "out", max_examples=100,
                   held_out=mixture, progress=False)
    by_name = {s["name"]: s for s in doc["sets"]}
    for spec, held in zip(files["sources"], (30, 10)):
        pairs = _complement(spec["path"], mixture, spec["name"])
        assert len(pairs) == held == by_name[spec["name"]]["examples"]
        torch.testing.assert_close(by_name[spec["name"]]["loss"],
                                   _hand_loss(tmp_path / "model", pairs), rtol=HAND_RTOL, atol=0)
    assert doc["held_out"] == str(mixture.resolve()) and doc["skipped"] == {}
    # an up-sampled source has no undrawn record: skipped and listed, the others still scored
    upsampled = _mix_of(files, tmp_path / "up", {"clean": 0.5, "corrupt50": 0.5}, 100)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(raw))
    assert evaluate_main(["--model", str(tmp_path / "model"), "--config", str(cfg_file),
                          "--out", str(tmp_path / "out2"), "--held-out", str(upsampled),
                          "--no-progress"]) == 0
    assert "skipped source 'clean'" in capsys.readouterr().out
    doc = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert set(doc["skipped"]) == {"clean", "corrupt50"}
    assert [s["role"] for s in doc["sets"]] == ["validation", "validation_all"]


def test_held_out_refusals(files, tmp_path, capsys):
    _save_fixed_model(tmp_path / "model")
    cfg, raw = sft_config(files, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        evaluate(tmp_path / "model", cfg, tmp_path / "o1", held_out=tmp_path, progress=False)
    only_clean = {**files, "sources": files["sources"][:1]}
    mixture = _mix_of(only_clean, tmp_path, {"clean": 1.0}, 10)
    with pytest.raises(ValueError, match="'corrupt50' of the config is not in this mixture"):
        evaluate(tmp_path / "model", cfg, tmp_path / "o2", held_out=mixture, progress=False)
    changed = dict(files["sources"][0], path=str(tmp_path / "clean_copy.jsonl"))
    Path(changed["path"]).write_text(Path(files["sources"][0]["path"]).read_text() + "\n")
    raw["data"]["sources"] = [changed]
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(raw))
    assert evaluate_main(["--model", str(tmp_path / "model"), "--config", str(cfg_file),
                          "--out", str(tmp_path / "o3"), "--held-out", str(mixture),
                          "--no-progress"]) == 2
    assert "changed since the mixture was drawn" in capsys.readouterr().err
    assert not (tmp_path / "o3" / "results.json").exists()
