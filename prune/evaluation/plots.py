"""PNG plots (matplotlib, optional: ``pip install 'vlm-prune[plot]'``), drawn without touching
pyplot's global state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

INSTALL_HINT = "PNG plots need matplotlib: pip install 'vlm-prune[plot]' (or pip install matplotlib)"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def figure(columns: int = 1, *, width: float = 4.6, height: float = 3.4):
    """(figure, axes list) on an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(INSTALL_HINT) from None
    fig = Figure(figsize=(width * columns, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, columns, i + 1) for i in range(columns)]
    return fig, axes


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def lines_vs_keep(
    ax,
    series: dict[str, Sequence[tuple[float, float | None]]],
    *,
    ylabel: str,
    title: str,
    baseline: float | None = None,
    ideal: Sequence[tuple[float, float | None]] | None = None,
) -> None:
    """One line per name of (keep, value) points; ``ideal`` a dashed black line (the same model on an
    input with just the kept number of tokens); ``baseline`` a grey horizontal line (unpruned)."""
    for i, (name, points) in enumerate(sorted(series.items())):
        pts = sorted((k, v) for k, v in points if v is not None)
        if pts:
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", color=f"C{i}", label=name)
    twin = sorted({k: v for k, v in (ideal or []) if v is not None}.items())
    if twin:
        ax.plot([k for k, _ in twin], [v for _, v in twin], ls="--", color="black", alpha=0.7, label="ideal")
    if baseline is not None:
        ax.axhline(baseline, color="grey", lw=1, ls=":", label="unpruned")
    ax.set_xlabel("keep (fraction of vision tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
