"""`scalebio compare`: one tiny end-to-end run (scalebio + uniform, 2 seeds) writes the promised
files; its per-seed numbers match the stage outputs and its mean/std match a second
implementation (statistics); bad inputs and a failing stage end with a clear, non-zero error."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from scalebio.cli import main as scalebio_main
from scalebio.llm.outputs import OutputError
from scalebio.llm.pipeline.compare import (
    METHODS,
    QUICK,
    CompareError,
    CompareSettings,
    compare,
    mean_std,
    parse_methods,
)

# Few steps, a handful of rows: the pipeline runs, the numbers mean nothing (~20 s on 2 cores).
TINY = CompareSettings(weight_steps=2, sft_steps=2, sft_lr=1e-3, sft_batch=4, num_examples=24,
                       eval_examples=4, baseline_examples=4, n_train=12, n_val=6, per_source=2,
                       threads=1, model=QUICK.model)
SEEDS = (0, 1)
STAGE_FILES = ("weights/weights.json", "mix/manifest.json", "sft/model/config.json",
               "eval/results.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    doc = compare(out, methods=("scalebio", "uniform"), seeds=SEEDS, settings=TINY,
                  progress=False)
    return out, doc


def test_files_and_schema(run):
    out, doc = run
    for name in ("compare.json", "compare.md", "compare.png", "config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "compare.json").read_text()) == doc
    assert doc["methods"] == ["scalebio", "uniform"] and doc["seeds"] == list(SEEDS)
    for m in doc["methods"]:
        for k in SEEDS:
            for f in STAGE_FILES:
                assert (out / "runs" / m / f"seed{k}" / f).is_file(), (m, k, f)
        r = doc["results"][m]
        assert set(r) == {"runs", "val_loss", "accuracy", "weights_mean"}
        assert [x["seed"] for x in r["runs"]] == list(SEEDS)
        assert set(r["runs"][0]) == {"seed", "val_loss", "accuracy", "correct", "checkable",
                                     "source_losses", "weights", "seconds", "stage_seconds"}
        assert set(r["runs"][0]["stage_seconds"]) == {"weights", "mix", "sft", "eval"}
        assert set(r["val_loss"]) == {"mean", "std"}
    table = (out / "compare.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| scalebio") or line.startswith("| unif")]
    assert len(rows) == 2
    first = doc["results"]["scalebio"]["val_loss"]
    assert f"{first['mean']:.4f} ± {first['std']:.4f}" in rows[0]


def test_per_seed_numbers_come_from_the_stage_outputs(run):
    out, doc = run
    for m in doc["methods"]:
        for r in doc["results"][m]["runs"]:
            folder = out / "runs" / m / f"seed{r['seed']}"
            sets = json.loads((folder / "eval" / "results.json").read_text())["sets"]
            total = next(s for s in sets if s["role"] == "validation_all")
            val = next(s for s in sets if s["role"] == "validation")
            assert r["val_loss"] == total["loss"]
            assert (r["correct"], r["checkable"]) == (val["correct"], val["checkable"])
            assert val["checkable"] > 0  # every demo validation answer is a number
            assert r["accuracy"] == val["correct"] / val["checkable"]
            stored = json.loads((folder / "weights" / "weights.json").read_text())
            torch.testing.assert_close(r["weights"], stored["averaged_weights"])
    k = len(doc["results"]["uniform"]["weights_mean"])
    for w in doc["results"]["uniform"]["weights_mean"].values():
        torch.testing.assert_close(w, 1.0 / k)


def test_mean_std_match_statistics(run):
    _, doc = run
    for m in doc["methods"]:
        r = doc["results"][m]
        for key in ("val_loss", "accuracy"):
            values = [x[key] for x in r["runs"]]
            torch.testing.assert_close(r[key]["mean"], statistics.mean(values))
            torch.testing.assert_close(r[key]["std"], statistics.stdev(values))
        names = r["weights_mean"]
        for n in names:
            want = statistics.mean(x["weights"][n] for x in r["runs"])
            torch.testing.assert_close(r["weights_mean"][n], want)


def test_mean_std_closed_form():
    # 1, 2, 3, 4: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3.
    got = mean_std([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(got["mean"], 2.5)
    torch.testing.assert_close(got["std"], (5.0 / 3.0) ** 0.5)
    assert mean_std([7.0]) == {"mean": 7.0, "std": None}


def test_existing_out_refused_without_overwrite(run, capsys):
    out, _ = run
    with pytest.raises(OutputError, match="--overwrite"):
        compare(out, methods=("uniform",), seeds=(0,), settings=TINY, progress=False)
    assert scalebio_main(["compare", "--out", str(out), "--methods", "uniform",
                          "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_unknown_method(tmp_path, capsys):
    with pytest.raises(ValueError, match="--methods"):
        parse_methods("scalebio,bogus")
    with pytest.raises(ValueError, match="--methods"):
        compare(tmp_path / "x", methods=("bogus",), settings=TINY, progress=False)
    assert not (tmp_path / "x").exists()  # refused before any work
    code = scalebio_main(["compare", "--out", str(tmp_path / "y"), "--methods", "uniform,bogus"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--methods" in err and "bogus" in err and all(m in err for m in METHODS)


def test_failing_stage_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "val.jsonl").write_text(json.dumps({"instruction": "What is 1 + 2?", "input": "",
                                                "output": "3"}) + "\n")
    config = tmp_path / "task.json"
    config.write_text(json.dumps({
        "model": {"config": {"hidden_size": 32}, "tokenizer": "char"},
        "data": {"sources": [{"name": "gone", "path": "data/missing.jsonl", "format": "alpaca"}],
                 "validation": [{"name": "val", "path": "data/val.jsonl", "format": "alpaca"}]},
    }))
    # every run checks that its data files exist before it starts: the first stage names it
    with pytest.raises(CompareError, match=r"method 'uniform', seed 3, stage 'weights'"):
        compare(tmp_path / "out", config_path=config, methods=("uniform",), seeds=(3,),
                settings=TINY, progress=False)
    code = scalebio_main(["compare", "--out", str(tmp_path / "out2"), "--config", str(config),
                          "--methods", "uniform", "--seeds", "3", "--no-progress"])
    assert code == 1
    assert "stage 'weights'" in capsys.readouterr().err


def test_more_rows_than_data_without_upsampling_is_refused_before_training(tmp_path, capsys):
    # TINY's demo task: 7 sources x 12 records = 84 rows; 85 cannot be reached taking each once
    s = CompareSettings(**{**TINY.__dict__, "num_examples": 85, "when_short": "cap"})
    with pytest.raises(ValueError, match="hold only 84 records"):
        compare(tmp_path / "x", methods=("uniform",), seeds=(0,), settings=s, progress=False)
    assert not (tmp_path / "x" / "runs").exists()  # refused before any (method, seed) ran
    code = scalebio_main(["compare", "--out", str(tmp_path / "y"), "--quick", "--when-short",
                          "cap", "--num-examples", "100000", "--no-progress"])
    assert code == 2
    assert "hold only 1120 records" in capsys.readouterr().err  # QUICK: 7 x 160


def test_capped_mixture_runs_end_to_end(tmp_path):
    s = CompareSettings(**{**TINY.__dict__, "num_examples": 84, "when_short": "cap"})
    doc = compare(tmp_path / "x", methods=("uniform",), seeds=(0,), settings=s, progress=False)
    manifest = json.loads((tmp_path / "x" / "runs" / "uniform" / "seed0" / "mix" /
                           "manifest.json").read_text())
    assert manifest["when_short"] == "cap" and manifest["num_examples_written"] == 84
    assert doc["settings"]["when_short"] == "cap"
