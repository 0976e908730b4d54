"""Bad inputs, faults and extremes through the CLI, one table row each.

A row builds its case in a fresh workspace and runs one command in-process (the ``*_main(argv)``
functions). It states the exit code and a fragment of the one ``scalebio: error:`` line (code 2)
or of a logged warning (code 0). For every row, every file outside the run's own new output
folder (the workspace, the shared data, model and prior run) is hashed before and after: nothing
may change, so no input and no earlier run is ever lost. ``early`` rows must be refused before
any tokenisation or output: their output folder is never even created.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from scalebio.llm import cli, run_folder
from scalebio.llm.data.tokenizer import char_tokenizer, char_vocab
from scalebio.llm.model import load_model
from scalebio.llm.tasks.demo_data import write_demo_sources

V = len(char_vocab())
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "vocab_size": V, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MAINS = {"reweight": cli.reweight_main, "mix": cli.mix_main, "sft": cli.sft_main,
         "evaluate": cli.evaluate_main, "baseline": cli.baseline_main}


@dataclass
class Base:
    """What every row shares (read-only for the rows, hashed like the rest)."""

    root: Path
    raw: dict  # the tiny config, as a dict
    sources: list[dict]
    val: dict
    model: Path  # a saved tiny model + tokenizer
    prior: Path  # a finished 2-step reweight run with 2 checkpoints
    cache: Path  # the shared tokenised-data cache (the one place rows may write)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("base")
    src = write_demo_sources(root / "data", seed=3, n_train_per_source=24, n_val=12,
                             corruption_rates=(0.5, 1.0), off_target=("prose",))
    cache = root / "cache"
    raw = {"model": {"config": dict(TINY), "tokenizer": "char"},
           "data": {"sources": src["sources"], "validation": [src["val"]], "max_length": 48,
                    "per_source": 2, "val_batch": 4, "cache_dir": str(cache)},
           "bilevel": {"steps": 2, "lr_u": 1e-2, "lr_w": 1e-2, "lr_lambda": 0.1},
           "run": {"seed": 1, "checkpoint_every": 1, "tracker": "none", "threads": 1}}
    model = root / "model"
    load_model(config=dict(TINY)).save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    prior = root / "prior"
    assert cli.reweight_main(["--config", str(cfg), "--out", str(prior), "--no-progress"]) == 0
    return Base(root, raw, src["sources"], src["val"], model, prior, cache)


class WS:
    """A row's workspace: a fresh folder, with helpers to write configs and files into it."""

    def __init__(self, root: Path, base: Base):
        self.root, self.base, self.out = root, base, root / "out"

    def config(self, changes: dict | None = None, raw=None, name: str = "cfg.yaml") -> str:
        """The base config with ``{"section.key[i].field": value}`` changes (None deletes)."""
        doc = copy.deepcopy(self.base.raw) if raw is None else raw
        for key, value in (changes or {}).items():
            _set(doc, key, value)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
        return str(path)

    def file(self, name: str, content: str | bytes | list) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            content = "".join(json.dumps(r) + "\n" for r in content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def src(self, i: int) -> str:
        return self.base.sources[i]["path"]

    def old_run(self, folder: Path | None = None) -> Path:
        """A previous run's files in ``folder`` (default: the row's output folder)."""
        folder = folder or self.out
        for name, text in (("weights.json", '{"weights": {"a": 1.0}}\n'), ("old.txt", "old"),
                           ("checkpoints/step_00000001/loop.pt", "not really")):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        return folder

    def prior_copy(self) -> str:
        shutil.copytree(self.base.prior, self.out)
        return str(self.out)


def _set(doc, key: str, value) -> None:
    parts = [p for chunk in key.split(".") for p in chunk.replace("]", "").split("[")]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value


def rw(ws: WS, changes=None, *flags) -> list[str]:
    return ["reweight", "--config", ws.config(changes), "--out", str(ws.out), "--no-progress",
            *flags]


@dataclass
class Row:
    id: str
    build: Callable[[WS], list[str]]
    code: int
    expect: str  # fragment of the error line (code != 0) or of a warning (code 0)
    early: bool = False  # refused before tokenising or touching the output folder
    own: bool = True  # False: the output folder existed before and must not change either
    check: Callable[[WS], None] | None = None  # more assertions after the command
    slow: bool = False


def _records(n: int, output: str = "42", instruction: str = "add two and two") -> list[dict]:
    return [{"instruction": f"{instruction} {i}", "input": "", "output": output}
            for i in range(n)]


def _lines(path: str, n: int) -> str:
    return "".join(Path(path).read_text().splitlines(keepends=True)[:n])


# ------------------------------------------------------------------------ rows: data loss
def _sources_inside_out(ws):
    data = ws.out / "data"
    data.mkdir(parents=True)
    for s in ws.base.sources:
        shutil.copy(s["path"], data)
    ws.old_run()
    changes = {f"data.sources[{i}].path": str(data / Path(s["path"]).name)
               for i, s in enumerate(ws.base.sources)}
    return rw(ws, changes, "--overwrite")


def _late_error_after_overwrite(ws):
    ws.old_run()
    bad = ws.file("bad.jsonl", _lines(ws.src(0), 2) + "{not json\n")
    return rw(ws, {"data.sources[0].path": bad}, "--overwrite")


def _divergence_after_overwrite(ws):
    """Diverges at step 1, before the new run's first checkpoint (at its end): the old run
    comes back. (After a checkpoint, the new run stands: it can be resumed.)"""
    ws.old_run()
    return rw(ws, {"bilevel.optimizer": "sgd", "bilevel.lr_u": 1e30, "bilevel.lr_w": 1e30,
                   "run.checkpoint_every": 0}, "--overwrite")


def _evaluate_own_model(ws):
    shutil.copytree(ws.base.model, ws.out / "model")
    return ["evaluate", "--model", str(ws.out / "model"), "--config", ws.config(), "--out",
            str(ws.out), "--overwrite", "--no-progress"]


def _sft_validation_inside_out(ws):
    ws.old_run()
    val = shutil.copy(ws.base.val["path"], ws.out / "val.jsonl")
    return ["sft", "--config", ws.config({"data.validation[0].path": str(val)}), "--data",
            ws.src(0), "--format", "alpaca", "--out", str(ws.out), "--overwrite", "--no-progress"]


def _config_inside_out(ws):
    ws.old_run()
    cfg = ws.config(name="out/cfg.yaml")
    return ["reweight", "--config", cfg, "--out", str(ws.out), "--overwrite", "--no-progress"]


def _abbreviated(flag):
    def build(ws):
        ws.old_run()
        return rw(ws, None, flag)
    return build


def _mix_abbreviated(ws):
    ws.old_run()
    weights = ws.file("w/weights.json", json.dumps({"weights": {s["name"]: 0.25 for s in
                                                                ws.base.sources},
                                                    "config": ws.base.raw}))
    return ["mix", "--weights", weights, "--num-examples", "8", "--out", str(ws.out), "--ov"]


@contextlib.contextmanager
def _held_lock(ws):
    """Another run holds the folder's lock (flock locks conflict between two opens even within
    one process, so this stands for a second process)."""
    fd = os.open(ws.out / run_folder.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 4242 on elsewhere since 2025-01-01T00:00:00: scalebio reweight\n")
    try:
        yield
    finally:
        os.close(fd)


def _resume_with(changes):
    def build(ws):
        ws.prior_copy()
        return rw(ws, changes, "--resume")
    return build


def _check_resume_log(ws):
    entry = json.loads((ws.out / "resume_log.jsonl").read_text().splitlines()[-1])
    assert entry["changed"] == {"bilevel.steps": [2, 3]}
    assert len(_trajectory(ws)) == 3


def _interrupted_overwrite(ws):
    """A run killed mid-overwrite: the old run set aside, a partial new one in place."""
    aside = ws.out / run_folder.ASIDE_NAME
    ws.old_run(aside)
    (ws.out / "cache").mkdir()
    (ws.out / "tb").mkdir()
    return rw(ws)


def _check_restored(ws):
    assert (ws.out / "old.txt").read_text() == "old"
    assert not (ws.out / run_folder.ASIDE_NAME).exists() and not (ws.out / "tb").exists()


def _check_replaced(ws):
    assert not (ws.out / "old.txt").exists() and not (ws.out / run_folder.ASIDE_NAME).exists()
    assert len(_trajectory(ws)) == 2


def _trajectory(ws) -> list[dict]:
    with open(ws.out / "trajectory.csv") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------ rows: tracebacks
def _damage(file: str, how: str):
    def build(ws):
        ws.prior_copy()
        f = ws.out / "checkpoints" / file
        f.write_bytes(b"" if how == "empty" else f.read_bytes()[: f.stat().st_size // 2])
        return rw(ws, None, "--resume")
    return build


def _all_damaged(ws):
    ws.prior_copy()
    for ck in (ws.out / "checkpoints").iterdir():
        (ck / "loop.pt").write_bytes(b"")
    return rw(ws, None, "--resume")


def _unwritable(target: str):
    def build(ws):
        if target == "parent":
            (ws.root / "ro").mkdir()
            out, flags = ws.root / "ro" / "out", []
        else:
            ws.old_run()
            out, flags = ws.out, ["--overwrite"]
        ws.ro = ws.root / "ro" if target == "parent" else ws.out
        for p in [ws.ro, *ws.ro.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return ["reweight", "--config", ws.config(), "--out", str(out), "--no-progress", *flags]
    return build


def _corrupt_manifest(ws):
    mix = ws.file("mix/manifest.json", "{not json")
    return ["evaluate", "--model", str(ws.base.model), "--config", ws.config(), "--out",
            str(ws.out), "--held-out", str(Path(mix).parent), "--no-progress"]


def _with_file(name: str, content, key: str = "data.sources[0].path", extra=None, flags=()):
    def build(ws):
        c = content(ws) if callable(content) else content
        return rw(ws, {key: ws.file(name, c), **(extra or {})}, *flags)
    return build


def _gpt2(ws):
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64,
            "n_positions": 32, "vocab_size": V, "bos_token_id": 1, "eos_token_id": 2}
    return rw(ws, {"model.config": gpt2})


def _bert(ws):
    bert = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": V}
    return rw(ws, {"model.config": bert})


def _file_mode_ok(ws):
    mode = 0o666 & ~_umask()
    for name in ("weights.json", "trajectory.csv", "weights.png", "losses.png"):
        assert stat.S_IMODE((ws.out / name).stat().st_mode) == mode, name


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _diverged_trajectory(ws):
    rows = _trajectory(ws)
    assert 1 <= len(rows) < 4  # kept up to the last good step, never the bad one


def _no_bars(ws):
    err = ws.stderr
    assert "%|" not in err and "it/s" not in err, err


def _evaluate_quiet(ws):
    return ["evaluate", "--model", str(ws.base.model), "--config", ws.config(), "--out",
            str(ws.out), "--max-examples", "2", "--max-new-tokens", "1", "--no-progress"]


def _sft_quiet(ws):
    return ["sft", "--config", ws.config({"bilevel.steps": 1, "data.global_batch": 2}), "--data",
            ws.src(0), "--format", "alpaca", "--out", str(ws.out), "--no-progress"]


def _baseline_uniform(ws):
    bad = ws.file("bad.jsonl", _lines(ws.src(0), 1) + '{"instruction": 1}\n')
    return ["baseline", "--method", "uniform", "--config",
            ws.config({"data.sources[1].path": bad}), "--out", str(ws.out), "--no-progress"]


def _no_assistant(ws):
    recs = [{"messages": [{"role": "user", "content": f"hello {i}"}]} for i in range(4)]
    return rw(ws, {"data.sources[0].path": ws.file("chat.jsonl", recs),
                   "data.sources[0].format": "messages"})


def _huge_alpha(ws):
    """Records over the alphabet {a, b}: every batch holds every token, so with α = 1e6 the
    validation term of w's gradient is lost in rounding and u, w stay bit-identical."""
    rng = __import__("random").Random(0)

    def recs(n):
        return [{"instruction": "".join(rng.choice("ab") for _ in range(6)), "input": "",
                 "output": "".join(rng.choice("ab") for _ in range(3))} for _ in range(n)]

    changes = {f"{SRC[i]}.path": ws.file(f"ab{i}.jsonl", recs(20)) for i in range(4)}
    changes["data.validation[0].path"] = ws.file("abv.jsonl", recs(10))
    return rw(ws, {**changes, "bilevel.alpha": 1e6, "bilevel.steps": 6, "bilevel.lr_u": 1e-3,
                   "bilevel.lr_w": 1e-3})


def _raw_text(text: str):
    def build(ws):
        path = ws.root / "cfg.yaml"
        path.write_text(text)
        return ["reweight", "--config", str(path), "--out", str(ws.out), "--no-progress"]
    return build


SRC = [f"data.sources[{i}]" for i in range(4)]
ROWS = [
    # --- data loss: nothing is deleted until the run is known to be valid
    Row("overwrite_sources_inside_out", _sources_inside_out, 2, "would delete inputs",
        early=True, own=False),
    Row("overwrite_config_inside_out", _config_inside_out, 2, "would delete inputs", early=True,
        own=False),
    Row("overwrite_then_malformed_source", _late_error_after_overwrite, 2, "bad.jsonl:3",
        own=False),
    Row("overwrite_then_divergence", _divergence_after_overwrite, 2, "not finite", own=False),
    Row("evaluate_overwrite_own_model", _evaluate_own_model, 2, "would delete inputs",
        early=True, own=False),
    Row("sft_overwrite_validation_inside_out", _sft_validation_inside_out, 2,
        "would delete inputs", early=True, own=False),
    Row("abbreviation_ov", _abbreviated("--ov"), 2, "unknown option --ov (did you mean "
        "--overwrite?)", early=True, own=False),
    Row("abbreviation_overwrit", _abbreviated("--overwrit"), 2, "unknown option --overwrit",
        early=True, own=False),
    Row("mix_abbreviation_ov", _mix_abbreviated, 2, "unrecognized arguments: --ov", early=True,
        own=False),
    Row("second_run_same_out", lambda ws: (ws.out.mkdir(), rw(ws))[1], 2,
        "in use by another scalebio run (pid 4242", own=False),
    Row("resume_changed_alpha", _resume_with({"bilevel.alpha": 2.0}), 2,
        "bilevel.alpha: 1.0 -> 2.0", own=False),
    Row("resume_changed_seed", _resume_with({"run.seed": 2}), 2, "run.seed: 1 -> 2", own=False),
    Row("resume_changed_per_source", _resume_with({"data.per_source": 3}), 2,
        "data.per_source: 2 -> 3", own=False),
    Row("resume_renamed_source", _resume_with({f"{SRC[3]}.name": "code"}), 2,
        "data.sources[3].name: 'prose' -> 'code'", own=False),
    Row("resume_more_steps_allowed", _resume_with({"bilevel.steps": 3}), 0,
        "bilevel.steps: 2 -> 3", check=_check_resume_log),
    Row("overwrite_replaces_after_success", lambda ws: (ws.old_run(), rw(ws, None,
        "--overwrite"))[1], 0, "", check=_check_replaced),
    Row("interrupted_overwrite_is_restored", _interrupted_overwrite, 2, "not empty",
        check=_check_restored),
    # --- tracebacks that are user errors: one line, exit 2
    Row("non_utf8_byte", _with_file("latin1.jsonl", lambda ws: _lines(ws.src(0), 1).encode()
        + b'{"instruction": "caf\xe9", "input": "", "output": "1"}\n'), 2,
        "latin1.jsonl:2: not UTF-8 text (byte 0xe9"),
    Row("truncated_checkpoint_falls_back", _damage("step_00000002/dcp/__0_0.distcp", "truncate"), 0,
        "step_00000002 is damaged"),
    Row("empty_checkpoint_falls_back", _damage("step_00000002/loop.pt", "empty"), 0,
        "loop.pt has 0 bytes"),
    Row("no_intact_checkpoint", _all_damaged, 2, "no intact checkpoint", own=False),
    Row("dtype_float64", lambda ws: rw(ws, {"model.dtype": "float64"}), 2,
        "model.dtype: expected float32, bfloat16 or float16", early=True),
    Row("dtype_float16_runs", lambda ws: rw(ws, {"model.dtype": "float16"}), 0, ""),
    Row("yaml_top_level_list", _raw_text("- model\n- data\n"), 2,
        "the top level must be a mapping", early=True),
    Row("lisa_without_blocks", lambda ws: rw(ws, {"model.config.num_hidden_layers": 0,
                                                   "lisa": {"enabled": True}}), 2,
        "lisa.enabled: LISA needs decoder blocks", early=True),
    Row("negative_prior", lambda ws: rw(ws, {"bilevel.prior": {
        "clean": 1, "corrupt50": -0.5, "corrupt100": 1, "prose": 1}}), 2,
        "bilevel.prior.corrupt50: need a finite number > 0", early=True),
    Row("unknown_model_type", lambda ws: rw(ws, {"model.config.model_type": "lama"}), 2,
        "unknown model type 'lama' (did you mean llama", early=True),
    Row("vocabulary_smaller_than_tokenizer", lambda ws: rw(ws, {"model.config.vocab_size": 50}),
        2, f"vocab_size: the embedding has 50 rows but the tokenizer has {V}", early=True),
    Row("heads_do_not_divide_hidden", lambda ws: rw(ws, {"model.config.hidden_size": 30,
                                                          "model.config.num_attention_heads": 4}),
        2, "model.config: The hidden size (30) is not a multiple of the number of attention "
        "heads (4)", early=True),
    Row("gpt2_positions_below_max_length", _gpt2, 2, "data.max_length: 48 > model.config."
        "n_positions 32", early=True),
    Row("tracker_not_installed", lambda ws: rw(ws, {"run.tracker": "wandb"}), 2,
        "run.tracker: wandb needs the wandb package", early=True),
    Row("threads_not_a_number", lambda ws: rw(ws, None, "--run.threads", "abc"), 2,
        "run.threads: expected an integer or null, got 'abc'", early=True),
    Row("cache_dir_is_a_file", lambda ws: rw(ws, {"data.cache_dir": ws.file("c.txt", "x")}), 2,
        "data.cache_dir:", early=True),
    Row("sources_bad_yaml_override", lambda ws: rw(ws, None, "--data.sources", "[1"), 2,
        "data.sources: not valid YAML", early=True),
    Row("output_parent_not_writable", _unwritable("parent"), 2, "not writable", early=True),
    Row("overwrite_read_only_run", _unwritable("run"), 2, "not writable", early=True,
        own=False),
    Row("corrupt_manifest", _corrupt_manifest, 2, "manifest.json: not valid JSON", early=True),
    # --- accepted silently before: an error or a warning that names the problem
    Row("all_responses_empty", _with_file("empty.jsonl", _records(6, output="")), 2,
        "every response is empty (6 examples)"),
    Row("validation_shared_with_source", _with_file("val.jsonl", lambda ws: _lines(
        ws.src(0), 5) + _lines(ws.base.val["path"], 7), key="data.validation[0].path"), 0,
        "leakage: 5 of 12 examples of validation file"),
    Row("validation_file_is_a_source", lambda ws: rw(ws, {"data.validation[0].path":
                                                          ws.src(0)}), 0, "(the same file)"),
    Row("one_file_two_sources", lambda ws: rw(ws, {f"{SRC[3]}.path": ws.src(0)}), 0,
        "sources 'clean' and 'prose': every example of 'prose' is also in the other (the same "
        "file)"),
    Row("one_record_source", _with_file("one.jsonl", _records(1)), 0,
        "has 1 usable example(s) but data.per_source is 2"),
    Row("unknown_characters_in_targets", _with_file("unk.jsonl", _records(
        4, output="d\u00e9j\u00e0")), 0, "target tokens are the tokenizer's unknown token"),
    Row("boolean_typo", lambda ws: rw(ws, None, "--lisa.enabled", "flase"), 2,
        "lisa.enabled: expected true or false, got 'flase'", early=True),
    Row("boolean_as_number", lambda ws: rw(ws, {"bilevel.alpha": True}), 2,
        "bilevel.alpha: expected a number, got True", early=True),
    Row("typo_inside_model_config", lambda ws: rw(ws, {"model.config.hiden_size": 32}), 2,
        "model.config.hiden_size: not a setting of llama models (did you mean hidden_size",
        early=True),
    Row("bidirectional_model", _bert, 2, "bert is a bidirectional encoder", early=True),
    Row("rotary_positions_below_max_length", lambda ws: rw(
        ws, {"model.config.max_position_embeddings": 32}), 0,
        "data.max_length 48 > model.config.max_position_embeddings 32"),
    Row("negative_seed", lambda ws: rw(ws, {"run.seed": -1}), 2, "run.seed: need an integer in",
        early=True),
    Row("huge_alpha_freezes_lambda", _huge_alpha, 0, "u and w have stayed identical for 5 steps"),
    Row("adamw_explodes", lambda ws: rw(ws, {"bilevel.lr_u": 10.0, "bilevel.lr_w": 10.0,
                                            "bilevel.steps": 4}), 2,
        "the losses exploded", check=_diverged_trajectory),
    Row("non_finite_keeps_trajectory", lambda ws: rw(ws, {
        "bilevel.optimizer": "sgd", "bilevel.lr_u": 1e30, "bilevel.lr_w": 1e30,
        "bilevel.steps": 4}), 2, "trajectory.csv holds steps 0-0", check=_diverged_trajectory),
    Row("baseline_uniform_reads_its_data", _baseline_uniform, 2,
        "bad.jsonl:2: field 'instruction' must be a string"),
    # --- vague or wrong messages
    Row("no_assistant_turn", _no_assistant, 2, "no record has an assistant turn (first: "),
    Row("empty_source_name", lambda ws: rw(ws, {f"{SRC[1]}.name": ""}), 2,
        "data.sources[1].name: a non-empty name is required", early=True),
    Row("learning_rate_as_word", lambda ws: rw(ws, {"bilevel.lr_u": "ten"}), 2,
        "bilevel.lr_u: expected a number, got 'ten'", early=True),
    Row("steps_as_word", lambda ws: rw(ws, {"bilevel.steps": "ten"}), 2,
        "bilevel.steps: expected an integer, got 'ten'", early=True),
    Row("max_length_one", lambda ws: rw(ws, {"data.max_length": 1}), 2,
        "data.max_length: need at least 2 tokens", early=True),
    Row("n_active_above_blocks", lambda ws: rw(ws, {"lisa": {"enabled": True, "n_active": 5}}),
        2, "lisa.n_active: 5 > the model's 2 blocks", early=True),
    Row("prior_unknown_name", lambda ws: rw(ws, {"bilevel.prior": {"nosuch": 1.0}}), 2,
        "bilevel.prior: unknown source name(s) ['nosuch']", early=True),
    # --- outputs: the user's file mode; --no-progress silences every bar
    Row("outputs_with_normal_mode", lambda ws: rw(ws), 0, "", check=_file_mode_ok),
    Row("no_progress_evaluate", _evaluate_quiet, 0, "", check=_no_bars),
    Row("no_progress_sft", _sft_quiet, 0, "", check=_no_bars),
]


def _snapshot(roots: list[Path], skip: list[Path]) -> dict[str, str]:
    """sha256 of every file under ``roots`` except under ``skip`` and lock files."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.name == run_folder.LOCK_NAME or any(p == s or s in p.parents for s in skip):
                continue
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def _run(argv: list[str], capsys) -> int:
    try:
        return MAINS[argv[0]](argv[1:])
    except SystemExit as e:  # argparse's own refusals
        return e.code


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=[pytest.mark.slow] if r.slow
                                              else []) for r in ROWS])
def test_bad_input(row: Row, base: Base, tmp_path, capsys, caplog, monkeypatch):
    if row.id == "tracker_not_installed":  # wandb absent whatever this machine has installed
        from scalebio.llm import preflight

        real = preflight.importlib.util.find_spec
        monkeypatch.setattr(preflight.importlib.util, "find_spec",
                            lambda name, *a: None if name == "wandb" else real(name, *a))
    ws = WS(tmp_path / "ws", base)
    ws.root.mkdir()
    argv = row.build(ws)
    if getattr(ws, "ro", None) is not None and os.geteuid() == 0:  # root ignores permissions
        ro = ws.ro
        monkeypatch.setattr(run_folder, "_writable", lambda p: not (p == ro or ro in p.parents))
    skip = [base.cache] + ([ws.out] if row.own else [])
    before = _snapshot([ws.root, base.root], skip)
    capsys.readouterr()
    caplog.clear()
    lock = _held_lock(ws) if row.id == "second_run_same_out" else contextlib.nullcontext()
    with lock, caplog.at_level(logging.WARNING):
        code = _run(argv, capsys)
    err = capsys.readouterr().err
    ws.stderr = err
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == row.code, f"exit {code}; stderr:\n{err}\nwarnings: {warnings}"
    assert "Traceback" not in err
    if code == 2 and "unrecognized" not in row.expect:
        lines = [ln for ln in err.splitlines() if ln.startswith("scalebio: error:")]
        assert len(lines) == 1 and row.expect in lines[0], err
    elif code == 2:
        assert row.expect in err, err
    elif row.expect:
        assert any(row.expect in w for w in warnings), warnings
    if row.early:
        assert row.own is False or not ws.out.exists(), sorted(ws.out.rglob("*"))
    for p in [ws.root, *ws.root.rglob("*")]:  # read-only rows: writable again for the cleanup
        p.chmod(p.stat().st_mode | 0o200)
    after = _snapshot([ws.root, base.root], skip)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    if row.check is not None:
        row.check(ws)
    assert not run_folder._locks and not run_folder._pending  # every lock released


def test_the_table_covers_the_issue():
    """At least the 45 cases of the issue and the data-loss cases, each once."""
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 60
