"""Run outputs: the output folder contract, atomic writes, weights.json, trajectory.csv, plots."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from scalebio.llm import run_folder
from scalebio.llm.run_folder import OutputError

TRAJECTORY_FIELDS = (  # reweight's trajectory.csv, then weight/ … grad_lambda/ per source
    "step",
    "alpha",
    "lr_scale",
    "val_loss",
    "train_loss_w",
    "train_loss_u",
    "gap",
    "grad_norm_lambda",
    "grad_norm_u",
    "grad_norm_w",
    "seconds",
)


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, inputs=()) -> None:
    """Lock and check ``out``; refuse an existing non-empty folder unless ``resume`` or
    ``overwrite`` (which sets the old contents aside until the new run stands, and is refused
    when ``out`` holds one of ``inputs``). The contract: :mod:`scalebio.llm.run_folder`."""
    run_folder.prepare(out, resume, overwrite, inputs)


def refuse_deleting_inputs(out: Path, overwrite: bool, inputs, error=OutputError) -> None:
    """With ``overwrite``, raise ``error`` when an input file or folder lies in (or is) ``out``:
    clearing ``out`` would delete it."""
    if overwrite:
        run_folder.refuse_deleting_inputs(out, inputs, error)


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file (0o666 less the umask); read once,
    at import, since reading the umask means setting it for a moment."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path`` (with the
    mode of an ordinary new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes the file private (0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def on_simplex(values) -> list[float]:
    """``values`` as float64, renormalised to sum to 1 (to float64 round-off).

    Weights computed in float32 (a softmax on a GPU, DoReMi's update) sum to 1 only to ~1e-7;
    users read these files and sum them, so they are written from float64 and renormalised."""
    import numpy as np

    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if not np.isfinite(v).all() or (v < 0).any() or v.sum() <= 0:
        raise ValueError(f"weights must be finite, ≥ 0 and not all 0; got {v.tolist()}")
    return (v / v.sum()).tolist()


def write_weights_json(path: Path, names, weights, averaged, extra: dict) -> dict:
    """``{"weights": {source: w}, "averaged_weights": {source: w}, ...}``, both written from
    float64 and renormalised to sum to 1 (:func:`on_simplex`); returns the document."""
    doc = {
        "weights": dict(zip(names, on_simplex(weights))),
        "averaged_weights": dict(zip(names, on_simplex(averaged))),
        **extra,
    }
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    run_folder.commit(path.parent)  # the run's product exists: an old run set aside can go
    return doc


def reweight_fields(names) -> list[str]:
    """The columns of reweight's trajectory.csv for sources ``names``."""
    kinds = ("weight", "loss_w", "loss_u", "grad_lambda")  # grad_lambda: λ's gradient, per source
    per_source = [f"{kind}/{n}" for kind in kinds for n in names]
    return list(TRAJECTORY_FIELDS) + per_source


def trajectory_csv(rows: list[dict], fields) -> str:
    """CSV text of ``rows`` in the columns ``fields`` (other keys dropped, floats to 9 digits)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_run(out: Path, rows: list[dict], names, diagnostics: dict | None = None) -> None:
    """weights.png (π per source vs step) and losses.png (validation, training losses, gap);
    with the run's ``diagnostics`` (``scalebio.llm.loop.diagnostics.diagnose``) also
    diagnostics.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        ax.plot(steps, [r[f"weight/{n}"] for r in rows], label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("weight π")
    ax.set_title("learned mixture weights")
    ax.legend(fontsize=8, ncol=2)
    _save_figure(fig, out / "weights.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(steps, [r["val_loss"] for r in rows], label="validation loss of w")
    axes[0].plot(steps, [r["train_loss_w"] for r in rows], label="weighted train loss of w")
    axes[0].plot(steps, [r["train_loss_u"] for r in rows], label="weighted train loss of u")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [r["gap"] for r in rows])
    axes[1].set_xlabel("step")
    axes[1].set_title("gap g(λ, w) − g(λ, u)")
    _save_figure(fig, out / "losses.png")
    plt.close(fig)
    if diagnostics is not None:
        plot_diagnostics(out, rows, names, diagnostics)


def plot_diagnostics(out: Path, rows: list[dict], names, diagnostics: dict) -> None:
    """diagnostics.png: each check (a)–(e) at every step, over the window that ends there, with
    its limit (dashed); the final window (the one the verdict reads) is shaded; then the verdict."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalebio.llm.loop import diagnostics as dg

    w = max(2, diagnostics["window"])
    roll = dg.rolling(rows, names, w)
    steps = [r["step"] for r in rows]
    growth = [dg.loss_growth(rows[: t + 1], w) for t in range(len(rows))]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7), layout="constrained")
    a, b, c, d, e, text = axes.ravel()
    a.plot(steps, roll["negative_gap_fraction"])
    a.axhline(dg.NEG_GAP_MAX, ls="--", c="k", lw=0.8)
    a.set_title(f"(a) share of negative gaps, last {w} steps")
    for n in names:
        b.plot(steps, roll["snr"][n], label=n)
    for y in (dg.SNR_MAX, -dg.SNR_MAX):
        b.axhline(y, ls="--", c="k", lw=0.8)
    b.set_title(f"(b) SNR of λ's gradient, last {w} steps")
    b.legend(fontsize=7, ncol=2)
    c.plot(steps, roll["weight_change"])
    c.axhline(diagnostics["stable_tolerance"], ls="--", c="k", lw=0.8)
    c.set_yscale("symlog", linthresh=1e-4)
    c.set_ylim(bottom=0)
    c.set_title(f"(c) largest change of π, last {w} steps")
    d.plot(steps, [r["grad_norm_lambda"] for r in rows])
    d.set_yscale("symlog", linthresh=1e-8)
    d.set_ylim(bottom=0)
    d.set_title("(d) ‖∇λ‖ (0: u and w identical)")
    e.plot(steps, growth)
    e.axhline(dg.LOSS_GROWTH_MAX, ls="--", c="k", lw=0.8)
    e.set_title(f"(e) largest loss / first, last {w} steps")
    for ax in (a, b, c, d, e):
        if steps:
            first = steps[-diagnostics["window"]] if diagnostics["window"] else steps[-1]
            ax.axvspan(first, steps[-1], color="0.9", zorder=0)
        ax.set_xlabel("step")
    text.axis("off")
    text.text(0, 1, textwrap.fill(diagnostics["verdict"], 60), va="top", fontsize=8,
              transform=text.transAxes)
    _save_figure(fig, out / "diagnostics.png")
    plt.close(fig)
