"""``joint``: one MLP scoring all members at once from every member's hidden state and the statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from salm.routers.base import Router
from salm.routers.config import HeadConfig
from salm.routers.layers import JointMLP
from salm.routers.registry import register_router


@register_router
class JointRouter(Router):
    """Per-member heads score each member from its own view; this one sees all hidden states together, so it
    can compare them directly (``projection_heads.<id>`` maps member ``id``'s hidden state into the trunk)."""

    name = "joint"
    reads_stats = True
    layer_norm_only = True
    width_weight = "joint_router.stats_projection.weight"

    def __init__(self, member_ids: Sequence[str], hidden_sizes: Sequence[int], config: HeadConfig):
        super().__init__(member_ids, hidden_sizes, config)
        dim = config.hidden_dim
        heads = {mid: nn.Linear(h, dim) for mid, h in zip(self.member_ids, self.hidden_sizes)}
        trunk = JointMLP(len(self.member_ids), self.input_width(len(self.member_ids)), dim, config.dropout)
        # Created heads first (the RNG draws), registered trunk first: the parameter order of earlier saLM, which
        # the optimizer state of a resumed run and the gradient-norm clipping depend on.
        self.joint_router = trunk
        self.projection_heads = nn.ModuleDict(heads)

    def forward(self, hidden_states: Sequence[torch.Tensor], inputs: torch.Tensor | None = None) -> torch.Tensor:
        x = self.read(inputs)
        projected = [self.projection_heads[mid](h) for mid, h in zip(self.member_ids, hidden_states)]
        return self.joint_router(projected, x).float()
