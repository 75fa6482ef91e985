"""Figures without pyplot: `matplotlib.figure.Figure` objects need no backend and no global state,
so plotting from library code is thread-safe and never opens a window."""

from __future__ import annotations

from matplotlib import rcParams
from matplotlib.figure import Figure


def subplots(*args, figsize=None, **kwargs):
    """(figure, axes) like `pyplot.subplots`, for `fig.savefig(path)`; nothing to close."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


__all__ = ["Figure", "rcParams", "subplots"]
