"""The two figures a run writes at its end: ``loss_curves.png`` and ``routing_share.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from salm.plotting import figure, save_png


def plot_loss_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Train and validation NLL (the mixture's, what the loss minimises besides entropy) per step."""
    fig = figure()
    ax = fig.add_subplot()
    tr = [(r["step"], r["train/nll"]) for r in records if "train/nll" in r]
    va = [(r["step"], r["val/nll"]) for r in records if "val/nll" in r]
    if tr:
        ax.plot(*zip(*tr), label="train NLL", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val NLL")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def plot_routing_share(routing: dict[str, dict[str, float]], ids: list[str], path: Path) -> None:
    """Share of validation positions routed (argmax) to each member, per dataset."""
    fig = figure()
    ax = fig.add_subplot()
    names = sorted(routing)
    width = 0.8 / max(len(ids), 1)
    x = np.arange(len(names))
    for i, mid in enumerate(ids):
        ax.bar(x + i * width - 0.4 + width / 2, [routing[d].get(mid, 0.0) for d in names], width, label=mid)
    ax.set_xticks(x, names)
    ax.set_ylabel("share of val positions (argmax)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
