"""Matplotlib without a display, and figures written atomically."""

from __future__ import annotations

from pathlib import Path

__all__ = ["new_figure", "save_figure"]


def new_figure(width: float = 5.5, height: float = 3.8, ncols: int = 1, nrows: int = 1):
    """(figure, axes): one Axes, a list of `ncols` side by side when ncols > 1, or with nrows > 1
    a list of rows, each a list of ncols Axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    if nrows > 1:
        return fig, [list(row) for row in axes]
    return fig, (axes[0, 0] if ncols == 1 else list(axes[0]))


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    tmp.replace(path)
