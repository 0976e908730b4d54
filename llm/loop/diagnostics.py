"""Run diagnostics of ``scalebio reweight``: can the learned weights be trusted yet?

Pure functions over the trajectory rows (the dicts of ``reweight._row``: ``gap``,
``grad_norm_lambda``, ``grad_lambda/<source>``, ``weight/<source>`` and the three losses), so that
every check can be tested on a hand-made trajectory. Each check reads a trailing window: the last
``window`` rows, or the last half of the run when ``window`` is None (the start of a run is
transient by design: u and w begin identical and λ at the prior).

The checks, each with the fix to try when it fails:

(a) negative gap: g(λ, w) − g(λ, u) < 0 means u, which should track the lower problem's minimiser,
    is worse on it than w: u lags. Fix: a λ warm-up, a larger lr_u; more u steps only with a
    λ step divided by α (the α sweep in docs/results.md: at α ≥ 10 they reversed the ranking).
(b) signal-to-noise of λ's gradient, per source: mean / standard error over the window. A large
    |SNR| means the gradient still pushes consistently one way: the weights have not converged
    (a decaying learning-rate schedule can freeze them before that, so (c) alone is not enough).
(c) weight stability: the largest change of any π_k over the window (max − min).
(d) λ's gradient exactly 0 for many consecutive steps: u and w identical, α too large.
(e) exploding losses: the losses grew well beyond their value at the first step.
"""

from __future__ import annotations

import math

# (a) On one batch g(λ, w) − g(λ, u) is noisy around its mean, so a few negative gaps are noise;
# u lagging shows as a large share of them, not as one.
NEG_GAP_MAX = 0.25
# (b) |mean| / standard error ≥ 3: a consistent push (a zero-mean gradient exceeds this with
# probability ~0.3 % per source under a normal approximation).
SNR_MAX = 3.0
# (c) Default tolerance when bilevel.stop_when_stable is unset: weights still moving by more
# than one percentage point over the window are not settled.
STABLE_TOL = 0.01
# (d) At step 0 u and w are identical and λ's gradient is 0 by construction; this many zero
# steps in a row is no longer the start (the loop warns after as many).
ZERO_RUN_MAX = 5
# (e) A loss above twice its value at the first step (an untrained model's) is diverging, not noise.
LOSS_GROWTH_MAX = 2.0

LOSSES = ("val_loss", "train_loss_w", "train_loss_u")


def window_size(n_rows: int, window: int | None = None) -> int:
    """Rows the trailing window holds: ``window`` (at most ``n_rows``), or the last half."""
    if window is not None and window < 1:
        raise ValueError(f"bilevel.diagnostics_window: need ≥ 1 or null, got {window!r}")
    return min(n_rows, window) if window is not None else max(1, n_rows // 2) if n_rows else 0


def _tail(rows: list[dict], window: int | None) -> list[dict]:
    w = window_size(len(rows), window)
    return rows[len(rows) - w:] if w else []


def negative_gap_fraction(rows: list[dict], window: int | None = None) -> float:
    """(a) Fraction of the window's steps with g(λ, w) − g(λ, u) < 0 (NaN on no rows)."""
    tail = _tail(rows, window)
    return sum(r["gap"] < 0 for r in tail) / len(tail) if tail else math.nan


def snr(values: list[float]) -> float:
    """mean / (sample std / √n); NaN for n < 2; 0 for all zeros, ±inf for a constant ≠ 0."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    if var == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / math.sqrt(var / n)


def lambda_snr(rows: list[dict], names, window: int | None = None) -> dict[str, float]:
    """(b) Per source, the SNR of λ's gradient component over the window."""
    tail = _tail(rows, window)
    return {n: snr([r[f"grad_lambda/{n}"] for r in tail]) for n in names}


def weight_change(rows: list[dict], names, window: int | None = None) -> float:
    """(c) max over sources of (max − min) of π_k over the window's rows."""
    tail = _tail(rows, window)
    if not tail:
        return math.nan
    return max(
        max(r[f"weight/{n}"] for r in tail) - min(r[f"weight/{n}"] for r in tail) for n in names
    )


def is_stable(rows: list[dict], names, window: int, tol: float) -> bool:
    """The stop rule: a full window of ``window`` rows over which π moved by ≤ ``tol``."""
    return len(rows) >= window and weight_change(rows, names, window) <= tol


def stop_window(steps: int, window: int | None) -> int:
    """The stop rule's window while the run is under way: ``window``, or half the planned steps
    (at least 2: one row cannot show a change)."""
    return window if window is not None else max(2, steps // 2)


def zero_gradient_run(rows: list[dict], window: int | None = None) -> int:
    """(d) The longest run of consecutive window steps with λ's gradient exactly 0."""
    longest = cur = 0
    for r in _tail(rows, window):
        cur = cur + 1 if r["grad_norm_lambda"] == 0 else 0
        longest = max(longest, cur)
    return longest


def loss_growth(rows: list[dict], window: int | None = None) -> float:
    """(e) The largest loss in the window over the largest at the first step (inf if not finite)."""
    tail = _tail(rows, window)
    if not tail:
        return math.nan
    values = [r[k] for r in tail for k in LOSSES]
    first = max(rows[0][k] for k in LOSSES)
    # checked one by one: max() silently skips a NaN that is not in first place
    if not all(math.isfinite(v) for v in values + [rows[0][k] for k in LOSSES]) or first <= 0:
        return math.inf
    return max(values) / first


def rolling(rows: list[dict], names, window: int) -> dict:
    """Per step t, the window checks over rows[t − window + 1 .. t] (for the plot)."""
    out = {"negative_gap_fraction": [], "weight_change": [], "snr": {n: [] for n in names}}
    for t in range(len(rows)):
        part = rows[max(0, t - window + 1): t + 1]
        out["negative_gap_fraction"].append(negative_gap_fraction(part, len(part)))
        out["weight_change"].append(weight_change(part, names, len(part)))
        for n, v in lambda_snr(part, names, len(part)).items():
            out["snr"][n].append(v)
    return out


def _num(x: float):
    """JSON has no NaN/inf: such a value is written as null."""
    return float(x) if math.isfinite(x) else None


def diagnose(rows: list[dict], names, window: int | None = None, tol: float | None = None,
             stopped_at: int | None = None) -> dict:
    """All checks over the trailing window, their pass/fail, and the verdict paragraph."""
    w = window_size(len(rows), window)
    tol = STABLE_TOL if tol is None else tol
    snrs = lambda_snr(rows, names, w)
    finite = {n: v for n, v in snrs.items() if not math.isnan(v)}
    top = max(finite, key=lambda n: abs(finite[n])) if finite else None
    d = {
        "window": w,
        "steps": len(rows),
        "stopped_when_stable_at": stopped_at,
        "negative_gap_fraction": _num(negative_gap_fraction(rows, w)),
        "lambda_grad_snr": {n: _num(v) for n, v in snrs.items()},
        "weight_change": _num(weight_change(rows, names, w)),
        "stable_tolerance": tol,
        "zero_lambda_gradient_run": zero_gradient_run(rows, w),
        "loss_growth": _num(loss_growth(rows, w)),
    }
    gap = d["negative_gap_fraction"]
    top_snr = abs(snrs[top]) if top is not None else math.nan
    growth = loss_growth(rows, w)
    d["checks"] = {
        "negative_gap": gap is not None and gap <= NEG_GAP_MAX,
        "lambda_grad_snr": top is not None and top_snr < SNR_MAX,
        "weights_stable": d["weight_change"] is not None and d["weight_change"] <= tol,
        "lambda_gradient_nonzero": d["zero_lambda_gradient_run"] < ZERO_RUN_MAX,
        "losses_bounded": growth <= LOSS_GROWTH_MAX,  # False for NaN and inf
    }
    d["trustworthy"] = all(d["checks"].values())
    d["verdict"] = verdict(d, top)
    return d


def _fmt(x: float | None) -> str:
    return "unbounded (a constant gradient)" if x is None else f"{x:.3g}"


def verdict(d: dict, top: str | None) -> str:
    """The plain-language paragraph: "trustworthy" or "not yet", each failed check with its number
    and the fix to try."""
    w, c = d["window"], d["checks"]
    head = f"over the last {w} of {d['steps']} steps"
    if d["stopped_when_stable_at"] is not None:
        head += f" (stopped early at step {d['stopped_when_stable_at']}: the weights were stable)"
    if d["trustworthy"]:
        snr = abs(d["lambda_grad_snr"][top])
        return (
            f"Verdict: trustworthy. All five checks pass {head}: "
            f"{d['negative_gap_fraction']:.0%} negative gaps (limit {NEG_GAP_MAX:.0%}), "
            f"largest |SNR| of λ's gradient {snr:.2f} (limit {SNR_MAX:g}), weights moved by "
            f"{d['weight_change']:.2g} (tolerance {d['stable_tolerance']:g}), no long run of zero "
            f"λ gradients, losses at most {d['loss_growth']:.2f}× their first value."
        )
    why = []
    if not c["negative_gap"]:
        gap = d["negative_gap_fraction"]
        why.append(
            "(a) no steps to judge u by" if gap is None else
            f"(a) {gap:.0%} of the steps had a negative gap g(λ, w) − g(λ, u) (limit "
            f"{NEG_GAP_MAX:.0%}): u lags the lower problem, so λ's gradient overstates the "
            "sources w fits better (weights come out exaggerated; their order often holds); try "
            "a λ warm-up (bilevel.lambda_warmup_steps) or a larger bilevel.lr_u; more u steps "
            "(bilevel.inner_steps_u) only with bilevel.lr_lambda divided by α, since at α ≥ 10 "
            "they reversed the demo's ranking"
        )
    if not c["lambda_grad_snr"]:
        why.append(
            "(b) too few steps to estimate the noise of λ's gradient; run more steps"
            if top is None else
            f"(b) λ's gradient still pushes consistently (SNR {_fmt(d['lambda_grad_snr'][top])}"
            f" for {top}, limit |SNR| < {SNR_MAX:g}): the weights have not converged; run more "
            "steps (bilevel.steps) or raise bilevel.lr_lambda"
        )
    if not c["weights_stable"]:
        noisy = c["lambda_grad_snr"]  # moving without a consistent push: noise drives λ
        why.append(
            f"(c) the weights still moved by {d['weight_change'] or math.nan:.3g} (tolerance "
            f"{d['stable_tolerance']:g}); "
            + ("λ's gradient is mostly noise: lower bilevel.lr_lambda or use larger batches "
               "(data.per_source)" if noisy else "run more steps (bilevel.steps)")
        )
    if not c["lambda_gradient_nonzero"]:
        why.append(
            f"(d) λ's gradient was exactly 0 for {d['zero_lambda_gradient_run']} steps in a row: "
            "u and w stayed identical, so bilevel.alpha is too large for the learning rates; "
            "lower it (or raise bilevel.lr_u / bilevel.lr_w)"
        )
    if not c["losses_bounded"]:
        g = d["loss_growth"]
        why.append(
            f"(e) the losses grew to {'non-finite' if g is None else f'{g:.3g}×'} their first "
            f"value (limit {LOSS_GROWTH_MAX:g}×): the models are diverging; lower bilevel.lr_u / "
            "bilevel.lr_w or set bilevel.clip"
        )
    return f"Verdict: not yet ({head}). " + ". ".join(why) + "."
