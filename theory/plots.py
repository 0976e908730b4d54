"""PNG plots for the validation report: one file per series kind, one subplot per claim.

Series formats (``Claim.series``, see ``scalebio.theory.report``):

* ``{"kind": "stationarity", "iters", "grad_norm", "bound", "slope"}`` — ‖∇Φ‖ (or the stationarity
  measure) against iterations, with the theoretical bound overlaid, log y axis.
* ``{"kind": "bias_vs_alpha", "alpha", "error", "bound", "slope"}`` — hypergradient bias against the
  penalty α on log-log axes, the fitted slope in the legend.
* ``{"kind": "weights", "iters", "weights", "optimum", "names"}`` — weight trajectories π_k(t), each
  against its optimum π*_k (dashed, same colour).

Figures are built with the object-oriented API on an Agg canvas, so importing this module never
touches pyplot's global backend (safe inside notebooks and on headless machines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# File name for each plot kind; the report embeds them and --overwrite replaces exactly these.
PLOT_FILES = {
    "stationarity": "stationarity.png",
    "bias_vs_alpha": "bias_vs_alpha.png",
    "weights": "weights.png",
}
REQUIRED_FIELDS = {
    "stationarity": ("iters", "grad_norm", "bound", "slope"),
    "bias_vs_alpha": ("alpha", "error", "bound", "slope"),
    "weights": ("iters", "weights", "optimum", "names"),
}
_SUBPLOT_SIZE = (4.8, 3.6)  # inches per panel: readable at the width of a markdown page
_MAX_COLUMNS = 3


def check_series(series: dict) -> None:
    """Raise ValueError naming the field when a known-kind series is malformed.

    Checks presence of every field, equal lengths of the paired lists, and (for weights) that each
    row has one entry per name. Unknown kinds are not checked here (the caller skips them).
    """
    kind = series.get("kind")
    if kind not in REQUIRED_FIELDS:
        return
    missing = [f for f in REQUIRED_FIELDS[kind] if f not in series]
    if missing:
        raise ValueError(f"series[{kind!r}]: missing field(s) {missing}")
    if kind == "weights":
        names, optimum = list(series["names"]), list(series["optimum"])
        if len(optimum) != len(names):
            raise ValueError(
                f"series['weights'].optimum: {len(optimum)} entries for {len(names)} names"
            )
        rows = list(series["weights"])
        if len(rows) != len(series["iters"]):
            raise ValueError(
                f"series['weights'].weights: {len(rows)} rows for {len(series['iters'])} iters"
            )
        for i, row in enumerate(rows):
            if len(row) != len(names):
                raise ValueError(
                    f"series['weights'].weights[{i}]: {len(row)} entries for {len(names)} names"
                )
        return
    x_name, y_name = REQUIRED_FIELDS[kind][:2]
    n = len(series[x_name])
    for f in (y_name, "bound"):
        if len(series[f]) != n:
            raise ValueError(f"series[{kind!r}].{f}: {len(series[f])} points for {n} {x_name}")
    if n == 0:
        raise ValueError(f"series[{kind!r}].{x_name}: empty")


def _grid(n: int) -> tuple[Figure, list]:
    cols = min(n, _MAX_COLUMNS)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(_SUBPLOT_SIZE[0] * cols, _SUBPLOT_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _positive(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Keep the points a log axis can show (finite and > 0 in y)."""
    keep = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and y > 0]
    return [x for x, _ in keep], [y for _, y in keep]


def _plot_stationarity(ax, s: dict) -> None:
    ax.plot(*_positive(s["iters"], s["grad_norm"]), label=f"measured (slope {s['slope']:.2f})")
    ax.plot(*_positive(s["iters"], s["bound"]), "k--", label="bound")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("stationarity measure")


def _plot_bias(ax, s: dict) -> None:
    label = f"error (fitted slope {s['slope']:.2f})"
    ax.plot(*_positive(s["alpha"], s["error"]), "o-", label=label)
    ax.plot(*_positive(s["alpha"], s["bound"]), "k--", label="bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("penalty α")
    ax.set_ylabel("hypergradient error")


def _plot_weights(ax, s: dict) -> None:
    iters = list(s["iters"])
    for k, label in enumerate(s["names"]):
        (line,) = ax.plot(iters, [row[k] for row in s["weights"]], label=str(label))
        ax.axhline(float(s["optimum"][k]), color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("weight π_k (dashed: optimum)")
    ax.set_ylim(bottom=0)


_PLOTTERS = {
    "stationarity": _plot_stationarity,
    "bias_vs_alpha": _plot_bias,
    "weights": _plot_weights,
}


def plot_kind(kind: str, panels: Sequence[tuple[str, str, dict]], path: Path) -> None:
    """Write one PNG with a subplot per (claim name, problem, series) panel.

    Args:
      kind: one of ``PLOT_FILES``.
      panels: (claim name, problem, series) triples, each series already passing check_series.
      path: where to write the PNG.
    """
    if kind not in _PLOTTERS:
        raise ValueError(f"kind: expected one of {sorted(_PLOTTERS)}, got {kind!r}")
    if not panels:
        raise ValueError("panels: nothing to plot")
    fig, axes = _grid(len(panels))
    for ax, (name, problem, series) in zip(axes, panels):
        _PLOTTERS[kind](ax, series)
        ax.set_title(f"{name}\n{problem}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def write_plots(panels_by_kind: dict[str, list[tuple[str, str, dict]]], out_dir: Path) -> list[str]:
    """Write one PNG per kind that has panels; return the file names written."""
    written = []
    for kind, file_name in PLOT_FILES.items():
        if panels_by_kind.get(kind):
            plot_kind(kind, panels_by_kind[kind], Path(out_dir) / file_name)
            written.append(file_name)
    return written
