"""Figures without pyplot: `matplotlib.figure.Figure` objects need no backend and no global state,
so plotting from library code is thread-safe and never opens a window.

matplotlib is imported on first use, not with this module: training commands import the modules that
plot (reports, curves) but most runs never draw, and matplotlib with its dependencies costs a few tenths of
a second of every start-up."""

from __future__ import annotations

import io

from titans import paths


def subplots(*args, figsize=None, **kwargs):
    """(figure, axes) like `pyplot.subplots`, for `fig.savefig(path)`; nothing to close."""
    from matplotlib.figure import Figure  # noqa: PLC0415  (see the module docstring)

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save_png(fig, path, *, dpi: int = 120) -> None:
    """A figure as a PNG file, local or in a bucket (gs://...), written whole and atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    paths.write_bytes(path, buf.getvalue())


def color_cycle() -> list[str]:
    """The colours of matplotlib's default property cycle, in order."""
    from matplotlib import rcParams  # noqa: PLC0415

    return rcParams["axes.prop_cycle"].by_key()["color"]


__all__ = ["color_cycle", "save_png", "subplots"]
