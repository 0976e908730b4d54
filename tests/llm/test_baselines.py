"""Mixture baselines (llm/baselines/): each rule against a closed form or a second
implementation, and one tiny end-to-end run per method checking the weights.json contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from scalebio import make_simplex
from scalebio import weights as simplex_weights
from scalebio.cli import main as scalebio_main
from scalebio.llm.baselines import (
    BaselineArgs,
    clipped_excess,
    cosine_scores,
    doremi_update,
    kronecker_projection,
    reducible_losses,
    rho_weights,
    scores_to_weights,
    size_weights,
    source_scores,
    top_p_ids,
    uniform_weights,
)
from scalebio.llm.baselines.less import head_gradients
from scalebio.llm.config import ConfigError
from scalebio.llm.data.tokenizer import char_vocab
from scalebio.llm.loop.setup import load_run_model
from scalebio.llm.tasks.demo_data import corrupt_name, write_demo_sources

PROJ_SIGMAS = 6.0  # Monte-Carlo check of E⟨Pᵀa, Pᵀb⟩ = ⟨a, b⟩: 6 standard deviations of one draw
# Engine AdamW vs torch.optim.AdamW: the same update, possibly another kernel (foreach vs loop),
# so float32 rounding only.
ENGINE_RTOL, ENGINE_ATOL = 1e-5, 1e-7

TINY = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "vocab_size": len(char_vocab()), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


# ---------------------------------------------------------------- uniform and size
def test_uniform_and_size_are_exact():
    torch.testing.assert_close(uniform_weights(4), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(size_weights([10, 30, 60]),
                               torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="sizes"):
        size_weights([3, 0])
    with pytest.raises(ValueError, match="num_sources"):
        uniform_weights(0)


# ---------------------------------------------------------------- DoReMi
def test_doremi_update_closed_form_and_direction():
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    lam = torch.tensor([0.0, 1.0], dtype=torch.float64)
    new = doremi_update(alpha, lam, eta=1.0, smoothing=0.0)
    e = math.e
    torch.testing.assert_close(new, torch.tensor([1 / (1 + e), e / (1 + e)], dtype=torch.float64))
    c = 0.1
    smoothed = doremi_update(alpha, lam, eta=1.0, smoothing=c)
    torch.testing.assert_close(smoothed, (1 - c) * new + c / 2)
    assert smoothed[1] > alpha[1]  # the source with the larger excess loss gains weight
    torch.testing.assert_close(smoothed.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_doremi_update_is_a_mirror_step_of_the_core_simplex():
    """Second implementation: SGD of step η on θ = log α with gradient −λ under the core's
    "mirror" geometry gives π ∝ α exp(ηλ), the unsmoothed DoReMi step."""
    g = torch.Generator().manual_seed(0)
    alpha = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    lam = torch.rand(5, generator=g, dtype=torch.float64)
    spec = make_simplex(5, geometry="mirror")
    theta = alpha.log() - 0.7 * (-lam)  # one descent step of η = 0.7 on −λ (ascent on λ)
    torch.testing.assert_close(simplex_weights(theta, spec), doremi_update(alpha, lam, 0.7, 0.0))


def test_clipped_excess_by_hand():
    proxy = torch.tensor([2.0, 1.0, 3.0, 0.5])
    ref = torch.tensor([1.0, 2.0, 1.0, 0.5])
    ids = torch.tensor([0, 0, 1, 1])
    got = clipped_excess(proxy, ref, ids, torch.tensor([2, 2]))
    torch.testing.assert_close(got, torch.tensor([(1.0 + 0.0) / 2, (2.0 + 0.0) / 2]))


# ---------------------------------------------------------------- RHO-LOSS style
def test_rho_rules_on_synthetic_losses():
    train = [torch.tensor([2.0, 2.0]), torch.tensor([3.0, 3.0, 3.0])]
    ref = [torch.tensor([1.5, 1.5]), torch.tensor([1.0, 1.0, 1.0])]
    r = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(reducible_losses(train, ref), r)
    w, _ = rho_weights(train, ref, "softmax", temperature=0.5)
    torch.testing.assert_close(w, torch.softmax(r / 0.5, 0))
    w, _ = rho_weights(train, ref, "positive")
    torch.testing.assert_close(w, torch.tensor([0.2, 0.8], dtype=torch.float64))
    neg = scores_to_weights(torch.tensor([-1.0, -2.0, -0.1]), "positive")
    torch.testing.assert_close(neg, torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="source 1"):
        reducible_losses(train, [ref[0], torch.tensor([1.0])])


# ---------------------------------------------------------------- LESS style
def test_cosine_ranking_and_top_p_by_hand():
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    s = cosine_scores(grads, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(s, torch.tensor([1.0, 1 / math.sqrt(2), 0.0, -1.0]))
    per_source = [s[:2], s[2:]]
    torch.testing.assert_close(source_scores(per_source),
                               torch.tensor([(1 + 1 / math.sqrt(2)) / 2, -0.5],
                                            dtype=torch.float64))
    assert top_p_ids(per_source, 0.5) == [[0, 1], []]
    assert top_p_ids([s[2:], s[:2]], 0.75) == [[0], [0, 1]]


def test_projection_shape_and_unbiased_inner_products():
    p = kronecker_projection(7, 5, 12, torch.Generator().manual_seed(1))
    assert p.left.shape == (7, 4) and p.right.shape == (5, 3)  # d_H = 3 ≤ √12, d_V = 4
    dense = p.dense().double()
    assert dense.shape == (35, 12)
    # every row of P = P_V ⊗ P_H has norm² (1)·(1) = 1 exactly
    torch.testing.assert_close((dense * dense).sum(1), torch.ones(35, dtype=torch.float64))
    # E⟨Pᵀa, Pᵀb⟩ = ⟨a, b⟩: the mean over independent draws is within PROJ_SIGMAS standard
    # errors (the sample std of the draws / √n) of the exact inner product
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(35, generator=g).double(), torch.randn(35, generator=g).double()
    draws = torch.tensor([float((a @ q) @ (b @ q)) for q in (
        kronecker_projection(7, 5, 12, torch.Generator().manual_seed(100 + k)).dense().double()
        for k in range(400))], dtype=torch.float64)
    assert abs(float(draws.mean() - a @ b)) < PROJ_SIGMAS * float(draws.std()) / math.sqrt(400)


def _autograd_head_gradients(model, mb) -> torch.Tensor:
    """Per-example ∇_W ℓ_i by autograd, one backward each (the second implementation)."""
    from scalebio.llm.loop.losses import per_example_loss

    head = model.get_output_embeddings().weight
    losses = per_example_loss(model(input_ids=mb["input_ids"]).logits, mb["labels"])
    return torch.stack([torch.autograd.grad(losses[i], head, retain_graph=True)[0].reshape(-1)
                        for i in range(losses.numel())])


def _head_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (2, 7), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_head_gradient_matches_closed_form_and_autograd():
    """Identity factors give vec(G_i) itself; it equals Σ_t (p_t − y_t) h_tᵀ / n_i written out
    and autograd's per-example gradient; a random Kronecker map equals autograd's gradient times
    the dense P. All in float64: default tolerances."""
    from scalebio.llm.baselines.less import KroneckerProjection
    from scalebio.llm.model import load_model

    model = load_model(config=TINY, seed=0).double()
    mb = _head_batch(3)
    vocab, hidden = model.get_output_embeddings().weight.shape
    eye = KroneckerProjection(torch.eye(vocab).double(), torch.eye(hidden).double())
    got = head_gradients(model, [mb], torch.device("cpu"), eye)
    ids, labels = mb["input_ids"], mb["labels"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        h, p = out.hidden_states[-1], torch.softmax(out.logits.double(), -1)
    for i in range(2):
        tgt = labels[i, 1:]
        mask = tgt != -100
        y = torch.nn.functional.one_hot(tgt[mask], TINY["vocab_size"]).double()
        want = (p[i, :-1][mask] - y).T @ h[i, :-1][mask] / mask.sum()
        torch.testing.assert_close(got[i], want.reshape(-1))
    auto = _autograd_head_gradients(model, mb)
    torch.testing.assert_close(got, auto)
    proj = kronecker_projection(vocab, hidden, 16, torch.Generator().manual_seed(4))
    proj = KroneckerProjection(proj.left.double(), proj.right.double())
    torch.testing.assert_close(head_gradients(model, [mb], torch.device("cpu"), proj),
                               auto @ proj.dense())


def test_bad_hyperparameters_name_the_flag():
    with pytest.raises(ConfigError, match="--smoothing"):
        BaselineArgs(smoothing=2.0)
    with pytest.raises(ConfigError, match="--rule"):
        BaselineArgs(rule="max")


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("baseline")
    src = write_demo_sources(d / "data", seed=5, n_train_per_source=10, n_val=6,
                             corruption_rates=(1.0,), off_target=("prose",))
    raw = {
        "model": {"config": TINY, "tokenizer": "char"},
        "data": {"sources": src["sources"], "validation": [src["val"]], "max_length": 40,
                 "per_source": 2, "val_batch": 4, "cache_dir": str(d / "cache")},
        "bilevel": {"steps": 2, "lr_u": 1e-2},
        "run": {"seed": 1, "tracker": "none", "threads": 1},
    }
    p = d / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _run(config: Path, out: Path, method: str, *flags: str) -> dict:
    rc = scalebio_main(["baseline", "--method", method, "--config", str(config), "--out",
                        str(out), "--no-progress", "--max-examples", "4", *flags])
    assert rc == 0
    doc = json.loads((out / "weights.json").read_text())
    names = doc["names"]
    assert doc["method"] == method and names == ["clean", corrupt_name(1.0), "prose"]
    for key in ("weights", "averaged_weights"):
        assert list(doc[key]) == names and all(v >= 0 for v in doc[key].values())
        assert math.isclose(sum(doc[key].values()), 1.0, rel_tol=1e-12)
    return doc


def test_uniform_and_size_end_to_end(config, tmp_path):
    doc = _run(config, tmp_path / "u", "uniform")
    assert doc["weights"] == {n: 1 / 3 for n in doc["names"]}
    doc = _run(config, tmp_path / "s", "size")
    usable = {n: 10 - doc["dropped_examples"][n] for n in doc["names"]}  # 10 records per file
    assert doc["examples"] == usable
    for n in doc["names"]:
        assert math.isclose(doc["weights"][n], usable[n] / sum(usable.values()), rel_tol=1e-12)


# Independent references for the trained baselines. The run's models are taken from the process by
# a global forward hook (nothing about how llm/baselines builds or holds them), told apart by what
# they trained on, and every loss is recomputed by a plain float64 forward of one unpadded example
# with the log-softmax written out. The run scores in float32 on padded batches: FORWARD_ATOL
# bounds that round-off (~1e-6 on a loss of ~log 107) with margin; a wrong example, model, mask or
# normalisation moves a loss by far more.
FORWARD_ATOL = 1e-4


class _ModelTap:
    """Every causal-LM forward while active: (model, autograd on?, unpadded input rows, a copy
    of the parameters at that moment when ``snapshot``)."""

    def __init__(self, snapshot: bool = False):
        self.snapshot, self.records = snapshot, []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook

        self.handle = register_module_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hook(self, module, args, kwargs, output):
        from transformers import PreTrainedModel

        if not (isinstance(module, PreTrainedModel) and hasattr(module, "lm_head")):
            return
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows = [tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask)]
        state = ({k: v.detach().clone() for k, v in module.state_dict().items()}
                 if self.snapshot and torch.is_grad_enabled() else None)
        self.records.append((module, torch.is_grad_enabled(), rows, state))

    def trained(self) -> list:
        """(model, rows, state) of each training forward (autograd on), in call order."""
        return [(m, rows, s) for m, grad, rows, s in self.records if grad]


def _tokenised(config: Path):
    """The run's tokenised sources, read through the data layer (not the baselines)."""
    from scalebio.llm.config_files import load_config
    from scalebio.llm.data.sources import load_sources
    from scalebio.llm.data.tokenizer import load_tokenizer

    cfg, _ = load_config(config)
    tok = load_tokenizer(cfg.model.tokenizer)
    return load_sources(cfg.data.source_specs(), cfg.data.validation_specs(), tok,
                        cfg.data.max_length, cfg.data.cache_dir)


@torch.no_grad()
def _plain_loss(model64, ids, labels) -> float:
    """ℓ = −(1/n) Σ_t log p(labels[t+1] | ids[..t]) over the n supervised targets, float64."""
    logits = model64(input_ids=torch.tensor([list(ids)])).logits[0, :-1].double()
    logp = logits - logits.logsumexp(-1, keepdim=True)
    tgt = torch.tensor(list(labels)[1:])
    keep = (tgt != -100).nonzero()[:, 0]
    return float(-logp[keep, tgt[keep]].mean())


def _float64(model=None, state=None):
    """A float64 copy of ``model`` (or of a fresh TINY model holding ``state``), in eval mode."""
    import copy

    from scalebio.llm.model import load_model

    if model is None:
        model = load_model(config=TINY, seed=0)
        model.load_state_dict(state)
    return copy.deepcopy(model).double().eval()


def test_doremi_end_to_end(config, tmp_path):
    """λ_t recomputed from the models themselves: the reference is the model trained first (DoReMi
    needs it before the proxy's first step), the proxy the other one, read at each of its training
    forwards; the step's rows are those the proxy trained on, their sources and labels looked up
    in the tokenised data. λ_{t,k} = Σ_{i∈k} max(ℓ_i^proxy − ℓ_i^ref, 0)/c_k, and α_t by the
    update written out in float64 from α_0 = uniform: must match excess, weights, averages."""
    with _ModelTap(snapshot=True) as tap:
        doc = _run(config, tmp_path / "d", "doremi", "--eta", "2.0", "--smoothing", "0.01")
    eta, c, k = 2.0, 0.01, 3
    trained = tap.trained()
    proxy = trained[-1][0]
    ref_model = trained[0][0]
    assert ref_model is not proxy
    proxy_steps = [(rows, s) for m, rows, s in trained if m is proxy]
    assert len(proxy_steps) == doc["steps"] == 2  # one micro-batch per step in this config
    data = _tokenised(config)
    lookup: dict[tuple, set] = {}
    for src, d in enumerate(data.train):
        for ids, labels in zip(d["input_ids"], d["labels"]):
            lookup.setdefault(tuple(ids), set()).add((src, tuple(labels)))
    ref64 = _float64(ref_model)
    alpha, used, excess = [1.0 / k] * k, [], []
    for rows, state in proxy_steps:
        proxy64 = _float64(state=state)
        gap, count = [0.0] * k, [0] * k
        for ids in rows:
            (src, labels), = lookup[ids]  # each trained row is one example of one source
            count[src] += 1
            gap[src] += max(_plain_loss(proxy64, ids, labels) - _plain_loss(ref64, ids, labels),
                            0.0)
        lam = [g / n if n else 0.0 for g, n in zip(gap, count)]
        raised = [a * math.exp(eta * x) for a, x in zip(alpha, lam)]
        alpha = [(1 - c) * r / sum(raised) + c / k for r in raised]
        used.append(alpha)
        excess.append(lam)
    assert min(excess[0]) > 0  # step 0: a fresh proxy vs a trained reference
    traj = doc["trajectory"]
    torch.testing.assert_close(torch.tensor(traj["excess"], dtype=torch.float64),
                               torch.tensor(excess, dtype=torch.float64),
                               rtol=0, atol=FORWARD_ATOL)
    for got, want in ((traj["weights"], used), (list(doc["weights"].values()), used[-1]),
                      (list(doc["averaged_weights"].values()),
                       [sum(col) / len(used) for col in zip(*used)])):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64),
                                   rtol=0, atol=FORWARD_ATOL)


def test_rho_end_to_end(config, tmp_path):
    """r_k recomputed from the models themselves: the reference is the model that trained on
    validation rows only, the other trained on all the sources; each scores the first 4 rows
    (--max-examples) of every source by a plain float64 forward; r_k = mean ℓ^train − mean ℓ^ref
    and π = softmax(r/T) in float64 must match what the run wrote."""
    t = 0.5
    with _ModelTap() as tap:
        doc = _run(config, tmp_path / "r", "rho", "--rule", "softmax", "--temperature", str(t))
    data = _tokenised(config)
    val_rows = {tuple(r) for r in data.val["input_ids"]}
    train_rows = {tuple(r) for d in data.train for r in d["input_ids"]}
    seen: dict[int, tuple] = {}
    for model, rows, _ in tap.trained():
        seen[id(model)] = (model, seen.get(id(model), (model, set()))[1] | set(rows))
    assert len(seen) == 2, "RHO trains two models"
    ref = [m for m, rows in seen.values() if rows <= val_rows]
    main = [m for m, rows in seen.values() if rows <= train_rows and not rows <= val_rows]
    assert len(ref) == len(main) == 1
    main64, ref64 = _float64(main[0]), _float64(ref[0])
    r = []
    for d in data.train:
        rows = list(zip(d["input_ids"][:4], d["labels"][:4]))
        r.append(sum(_plain_loss(main64, i, lab) - _plain_loss(ref64, i, lab)
                     for i, lab in rows) / len(rows))
    e = [math.exp(x / t) for x in r]
    want = [x / sum(e) for x in e]
    got_r = [doc["reducible_loss"][n] for n in doc["names"]]
    got_w = [doc["weights"][n] for n in doc["names"]]
    for got, ref_values in ((got_r, r), (got_w, want)):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(ref_values, dtype=torch.float64),
                                   rtol=0, atol=FORWARD_ATOL)


def test_less_end_to_end_with_top_p(config, tmp_path):
    out = tmp_path / "l"
    doc = _run(config, out, "less", "--rule", "positive", "--proj-dim", "16", "--top-p", "0.5")
    assert set(doc["scores"]) == set(doc["names"])
    assert all(-1.0 <= s <= 1.0 for s in doc["scores"].values())
    sel = json.loads((out / "selected.json").read_text())
    assert sum(len(v) for v in sel["ids"].values()) == math.ceil(0.5 * 3 * 4)
    kept = [s for n in doc["names"] for i, s in enumerate(sel["scores"][n]) if i in sel["ids"][n]]
    left = [s for n in doc["names"] for i, s in enumerate(sel["scores"][n])
            if i not in sel["ids"][n]]
    assert min(kept) >= max(left)  # the filter keeps the highest cosine scores
    per_source = torch.tensor([sum(sel["scores"][n]) / 4 for n in doc["names"]],
                              dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(list(doc["scores"].values()), dtype=torch.float64),
                               per_source)
    want = scores_to_weights(per_source, "positive")
    torch.testing.assert_close(torch.tensor(list(doc["weights"].values()), dtype=torch.float64),
                               want)
    again = _run(config, tmp_path / "l2", "less", "--rule", "positive", "--proj-dim", "16")
    assert again["weights"] == doc["weights"]  # seeded projection and training: reproducible


def test_cli_refuses_bad_input(config, tmp_path, capsys):
    assert scalebio_main(["baseline", "--method", "size", "--config", str(config), "--out",
                          str(tmp_path / "x"), "--bilevel.nope", "1"]) == 2
    assert "bilevel.nope" in capsys.readouterr().err
    assert scalebio_main(["baseline", "--method", "less", "--config", str(config), "--out",
                          str(tmp_path / "y"), "--steps", "1", "--proj-dim", "10000000"]) == 2
    assert "--proj-dim" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scalebio_main(["baseline", "--method", "magic", "--config", str(config), "--out", "x"])


# ---------------------------------------------------------------- training through the engine
def _trainer_setup(config: Path, **sections):
    from scalebio.llm.config_files import config_from_dict
    from scalebio.llm.loop.setup import build_sampler, load_data

    raw = yaml.safe_load(config.read_text())
    raw.update(sections)
    cfg = config_from_dict(raw)
    tokenizer, data = load_data(cfg, config.parent)
    return cfg, build_sampler(cfg, data, tokenizer.pad_token_id)


def test_engine_training_equals_a_plain_adamw_loop(config):
    """Without LISA the engine's AdamW (weight decay 0) is torch's: same parameters after 3 steps
    as a hand-written torch.optim.AdamW loop on the same batches (float32; ENGINE_RTOL)."""
    from scalebio.llm.baselines import common

    cfg, sampler = _trainer_setup(config)
    device, lr = torch.device("cpu"), 1e-2
    pi = torch.tensor([0.5, 0.3, 0.2])
    model = load_run_model(cfg, device)
    common.train_weighted(common.Trainer(cfg, model, lr), sampler, 3, device,
                          lambda batch, h: pi, "engine", progress=False)
    ref = load_run_model(cfg, device)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.0)
    for step in range(3):
        loss = (pi * common.source_losses(ref, sampler.batch(step), device)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=ENGINE_RTOL, atol=ENGINE_ATOL, msg=name)


def test_lisa_trains_only_the_drawn_blocks(config):
    from scalebio.llm.baselines import common
    from scalebio.llm.engines.lisa import LisaConfig, active_blocks_for

    cfg, sampler = _trainer_setup(config, lisa={"enabled": True, "n_active": 1, "period": 5,
                                                "train_embeddings": False, "train_head": False})
    device = torch.device("cpu")
    model = load_run_model(cfg, device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = common.Trainer(cfg, model, 1e-2)
    common.train_on_validation(trainer, sampler, 3, device, progress=False)  # one LISA period
    (drawn,) = active_blocks_for(0, cfg.run.seed, 2, LisaConfig(n_active=1, period=5), "w")
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        # the drawn block trains, and the final norm (small, always trained: llm/engines/lisa.py);
        # the other block, the embeddings and the head (both switched off here) stay put
        assert changed == name.startswith((f"model.layers.{drawn}.", "model.norm.")), name


def test_multi_rank_engines_are_refused(config):
    from scalebio.llm.baselines import common

    cfg, _ = _trainer_setup(config, engine={"kind": "ddp"})
    with pytest.raises(ConfigError, match="baselines run in one process"):
        common.Trainer(cfg, load_run_model(cfg, torch.device("cpu")), 1e-2)
