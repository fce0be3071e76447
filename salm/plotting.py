"""Figures for reports, drawn on the Agg canvas without pyplot: no global backend switch in the caller's
process (a notebook keeps its own), no figure registry to leak, and PNGs written atomically."""

from __future__ import annotations

import os
from typing import Any

from salm.io import atomic_write


def figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, **savefig_kwargs))
