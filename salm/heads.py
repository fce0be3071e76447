"""The scalar projection head: a member's hidden state -> one routing score."""

from __future__ import annotations

import torch
from torch import nn


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

    def __init__(self, input_dim: int, hidden_dim: int = 256, dropout: float = 0.1, norm: str = "layer"):
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

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """[..., input_dim] -> [...]: every position at once (the seed looped over positions in Python)."""
        w = self.non_linear_projection[0].weight
        return self.non_linear_projection(hidden_state.to(w.dtype)).squeeze(-1)
