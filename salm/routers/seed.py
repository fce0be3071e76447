"""``seed``: one scalar head per member on its own final hidden state (the seed's heads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from salm.routers.base import Router
from salm.routers.config import HeadConfig
from salm.routers.layers import ScalarProjectionHead
from salm.routers.registry import register_router

_FIRST_LAYER = "non_linear_projection.0.weight"
_STATS = ".stats_projection.weight"


@register_router
class SeedRouter(Router):
    """Member ``m``'s score is its head on its own hidden state: the heads learn which *domain* a text is in.

    Subclasses that read router inputs give each head a ``stats_projection`` added to its first layer.
    """

    name = "seed"

    def __init__(self, member_ids: Sequence[str], hidden_sizes: Sequence[int], config: HeadConfig):
        super().__init__(member_ids, hidden_sizes, config)
        width = self.input_width(len(self.member_ids))
        self.projection_heads = nn.ModuleDict(
            {
                mid: ScalarProjectionHead(h, config.hidden_dim, config.dropout, norm=config.norm, stats_dim=width)
                for mid, h in zip(self.member_ids, self.hidden_sizes)
            }
        )

    def forward(self, hidden_states: Sequence[torch.Tensor], inputs: torch.Tensor | None = None) -> torch.Tensor:
        x = self.read(inputs)
        scores = [self.projection_heads[mid](h, x) for mid, h in zip(self.member_ids, hidden_states)]
        return torch.stack(scores, dim=-1).float()

    @classmethod
    def matches_state(cls, state: Mapping[str, torch.Tensor]) -> bool:
        heads = any(k.startswith("projection_heads.") and ".non_linear_projection." in k for k in state)
        return heads and not any(k.startswith("joint_router.") or k.endswith(_STATS) for k in state)

    @classmethod
    def config_of_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        """Norm (running statistics mean the seed's BatchNorm) and width; dropout has no weights (the default)."""
        fields: dict = {"norm": "batch" if any("running_mean" in k for k in state) else "layer"}
        w0 = next((v for k, v in state.items() if k.endswith(_FIRST_LAYER)), None)
        if w0 is not None:
            fields["hidden_dim"] = w0.shape[0]
        return fields

    @staticmethod
    def stats_widths(state: Mapping[str, torch.Tensor]) -> list[int]:
        """The input width of every head's ``stats_projection`` (one per member; ids may hold dots)."""
        return [v.shape[-1] for k, v in state.items() if k.endswith(_STATS)]
