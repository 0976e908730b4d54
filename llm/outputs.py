"""Run outputs: the output folder contract, atomic writes, weights.json, trajectory.csv, plots."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

TRAJECTORY_FIELDS = (
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


class OutputError(RuntimeError):
    """The output folder cannot be used as asked (exists, not resumable, …)."""


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an existing non-empty folder unless ``resume`` or ``overwrite`` (then clear it)."""
    if resume and overwrite:
        raise OutputError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    nonempty = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / "checkpoints").is_dir():
            raise OutputError(f"{out}: --resume given but the folder holds no checkpoints/")
        return
    if nonempty and not overwrite:
        raise OutputError(
            f"{out}: folder exists and is not empty; pass --resume to continue that run or "
            "--overwrite to replace it"
        )
    if nonempty:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
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
    return doc


def trajectory_csv(rows: list[dict], names) -> str:
    buf = io.StringIO()
    fields = (
        list(TRAJECTORY_FIELDS)
        + [f"weight/{n}" for n in names]
        + [f"loss_w/{n}" for n in names]
        + [f"loss_u/{n}" for n in names]
    )
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_run(out: Path, rows: list[dict], names) -> None:
    """weights.png (π per source vs step) and losses.png (validation, training losses, gap)."""
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
