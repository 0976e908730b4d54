"""Hyperparameters of the baseline methods (``scalebio baseline``): defined once, the CLI's flags
are made from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from scalebio.llm.config import ConfigError

BASELINE_METHODS = ("uniform", "size", "doremi", "rho", "less")
SCORE_RULES = ("softmax", "positive")  # how RHO and LESS scores become weights


def _flag(default, help: str, **argparse_kw):
    """A field that is also a ``scalebio baseline`` flag (``--proj-dim`` for ``proj_dim``)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass(frozen=True)
class BaselineArgs:
    """Hyperparameters of the baseline methods; the CLI's flags are made from these fields."""

    steps: int | None = _flag(None, "steps of every model a method trains (default bilevel.steps)")
    lr: float | None = _flag(None, "AdamW learning rate of those models (default bilevel.lr_u)")
    eta: float = _flag(1.0, "DoReMi's exponentiated-gradient step size")
    smoothing: float = _flag(1e-3, "DoReMi's mixing c with the uniform weights")
    rule: str = _flag("softmax", "rho/less: softmax(score/T), or proportional to the positive "
                      "part of the scores", choices=SCORE_RULES)
    temperature: float = _flag(1.0, "T of --rule softmax")
    proj_dim: int = _flag(64, "LESS projection dimension")
    top_p: float | None = _flag(None, "LESS: also write selected.json with the top fraction of "
                                "examples")
    max_examples: int = _flag(256, "rho/less: examples scored per source and of validation "
                              "(the first ones)")
    eval_batch: int = _flag(16, "examples per forward pass when scoring")

    def __post_init__(self):
        def check(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"baseline --{key.replace('_', '-')}: {msg}")

        check(self.steps is None or self.steps >= 1, "steps", f"need ≥ 1, got {self.steps!r}")
        check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr!r}")
        check(self.eta > 0, "eta", f"must be > 0, got {self.eta!r}")
        check(0 <= self.smoothing <= 1, "smoothing", f"must lie in [0, 1], got {self.smoothing!r}")
        check(self.rule in SCORE_RULES, "rule", f"expected one of {SCORE_RULES}, got {self.rule!r}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature!r}")
        check(self.proj_dim >= 1, "proj_dim", f"need ≥ 1, got {self.proj_dim!r}")
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p",
              f"must lie in (0, 1], got {self.top_p!r}")
        check(self.max_examples >= 1, "max_examples", f"need ≥ 1, got {self.max_examples!r}")
        check(self.eval_batch >= 1, "eval_batch", f"need ≥ 1, got {self.eval_batch!r}")
