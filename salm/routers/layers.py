"""The routers' building blocks: the seed's scalar head and the joint router's MLP, and eval-mode routing.

The modules keep the seed's parameter names (``non_linear_projection.<i>``), so its state dicts load.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_EVAL_HEADS = contextvars.ContextVar("salm_eval_heads", default=False)


@contextlib.contextmanager
def heads_in_eval_mode() -> Iterator[None]:
    """Inside this block (on this thread only) heads compute as in eval mode, whatever their ``training`` flag.

    Generation routes with eval-mode heads but must not call ``model.eval()``/``model.train()``: those flip
    flags shared by every thread using the model (a training loop, another generation), so one caller's
    restore would turn dropout on in the middle of another's decoding. A context variable is private to
    the thread (and asyncio task) that sets it.
    """
    token = _EVAL_HEADS.set(True)
    try:
        yield
    finally:
        _EVAL_HEADS.reset(token)


class _RowBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dim of any-rank input; only used to load the seed's BatchNorm heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


class ScalarProjectionHead(nn.Module):
    """The seed's head, with LayerNorm instead of BatchNorm by default.

    BatchNorm crashed at batch 1 and mixed padding positions into its statistics; LayerNorm normalises
    each position on its own. ``norm="batch"`` exists only to run heads trained by the seed. The
    parameter names (``non_linear_projection.<i>``) match the seed's so its state dicts load.
    """

    def __init__(
        self, input_dim: int, hidden_dim: int = 256, dropout: float = 0.1, norm: str = "layer", stats_dim: int = 0
    ):
        super().__init__()
        if norm not in ("layer", "batch"):
            raise ValueError(f"norm must be 'layer' or 'batch', got {norm!r}")
        intermediate = hidden_dim // 2
        norm_cls = nn.LayerNorm if norm == "layer" else _RowBatchNorm
        self.norm = norm
        self.non_linear_projection = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            norm_cls(hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, intermediate),
            norm_cls(intermediate),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(intermediate, 1),
        )
        # Only confidence heads have it: seed heads keep exactly the seed's parameter names.
        self.stats_projection = nn.Linear(stats_dim, hidden_dim, bias=False) if stats_dim else None

    def forward(self, hidden_state: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
        """[..., input_dim] (+ stats [..., stats_dim]) -> [...]: every position at once."""
        layers = self.non_linear_projection
        w = layers[0].weight
        x = hidden_state.to(w.dtype)
        if self.stats_projection is not None:
            if stats is None:
                raise ValueError("this confidence head needs the members' confidence statistics (stats=)")
            x = layers[0](x) + self.stats_projection(stats.to(w.dtype))
            layers = layers[1:]
        if self.training and _EVAL_HEADS.get():
            return _eval_forward(layers, x).squeeze(-1)
        return layers(x).squeeze(-1)


def _eval_forward(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The layers as in eval mode without touching their flags: no dropout, BatchNorm on running statistics."""
    for layer in layers:
        if isinstance(layer, nn.Dropout):
            continue
        if isinstance(layer, _RowBatchNorm):
            shape = x.shape
            x = F.batch_norm(
                x.reshape(-1, shape[-1]), layer.running_mean, layer.running_var, layer.weight, layer.bias,
                training=False, eps=layer.eps,
            ).reshape(shape)  # fmt: skip
        else:
            x = layer(x)
    return x


class JointMLP(nn.Module):
    """One MLP over every member's (projected) hidden state plus the confidence statistics -> M scores.

    Per-member heads score each member from that member's view alone (plus the shared statistics); the
    joint router sees all hidden states together, so it can compare them directly.
    """

    def __init__(self, n_members: int, stats_dim: int, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        intermediate = hidden_dim // 2
        self.stats_projection = nn.Linear(stats_dim, hidden_dim, bias=True)
        self.trunk = nn.Sequential(
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, intermediate),
            nn.LayerNorm(intermediate),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(intermediate, n_members),
        )

    def forward(self, projected: list[torch.Tensor], stats: torch.Tensor) -> torch.Tensor:
        """Per-member projections [..., hidden_dim] and stats [..., F] -> router logits [..., M]."""
        x = self.stats_projection(stats.to(self.stats_projection.weight.dtype))
        for p in projected:
            x = x + p
        if self.training and _EVAL_HEADS.get():
            return _eval_forward(self.trunk, x)
        return self.trunk(x)
