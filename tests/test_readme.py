"""The README's ten-line example runs and learns what it says it learns."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
L1_TOL = 0.05  # softmax logits approach the face [0.7, 0, 0.3, 0] only as θ → ±∞; 2000 steps


def test_ten_line_example():
    text = README.read_text()
    block = re.search(r"## Learn weights in ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    code_lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(code_lines) <= 11  # "about ten lines"
    scope: dict = {}
    exec(compile(block.replace("num_steps=2000)", "num_steps=2000, progress=False)"),
                 "README", "exec"), scope)
    w = scope["result"].weights
    assert float((w - torch.tensor([0.7, 0.0, 0.3, 0.0])).abs().sum()) < L1_TOL
