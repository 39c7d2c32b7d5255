"""Plots: training curves and the figures of the benchmark and side-by-side commands.

matplotlib is an optional dependency (the ``plots`` extra, which ``make`` installs): every figure
goes through :func:`pyplot`, which draws off-screen (the Agg backend) and, where matplotlib is
missing, raises an ImportError that says how to install it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the off-screen Agg backend; ImportError naming the ``plots`` extra
    when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'gatezoo[plots]' (or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: Sequence[Mapping], path: Path, panels: Sequence[tuple[str, Sequence[str]]],
                title: str = "") -> None:
    """``curves.png``: one panel per ``(y label, metric keys)`` of ``panels``, against epoch."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    epochs = [r["epoch"] for r in rows]
    for ax, (ylabel, keys) in zip(axes[0], panels):
        for key, marker in zip(keys, "os^v"):
            if key in rows[0]:
                ax.plot(epochs, [r[key] for r in rows], f"{marker}-", label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, title)


def save_figure(fig, path: Path, title: str = "") -> None:
    """Title ``fig``, lay it out, write it to ``path`` as PNG and close it."""
    plt = pyplot()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


