"""``evidence``: one MLP over what the members' own numbers say, blind to their hidden states."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from salm.routers.base import Router
from salm.routers.config import HeadConfig
from salm.routers.registry import register_router


@register_router
class EvidenceRouter(Router):
    """Heads that read hidden states can recognise the very texts they were trained on. On subjects they never
    saw (new people, new cases) that memory routes at random: with LoRA fact specialists, the ``aware`` heads
    scored 0.73-0.79 on questions about unseen people although the members' record on the question alone told the
    specialist that knew them from the one that did not on 48 of 48 (``benchmarks/real_specialists.py``).

    This router reads only what carries over to new subjects: every member's next-token statistics and its record
    on the text so far (:mod:`salm.confidence`), ``stored_dim(M)`` floats, through one small MLP to ``M`` scores.
    It cannot memorise its training texts, and it cannot route on topic either: only on evidence of knowing.
    """

    name = "evidence"
    reads_stats = True
    reads_history = True
    layer_norm_only = True
    width_weight = "evidence_router.0.weight"

    def __init__(self, member_ids: Sequence[str], hidden_sizes: Sequence[int], config: HeadConfig):
        super().__init__(member_ids, hidden_sizes, config)
        M, dim = len(self.member_ids), config.hidden_dim
        self.evidence_router = nn.Sequential(
            nn.Linear(self.input_width(M), dim), nn.LayerNorm(dim), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(dim, M),
        )  # fmt: skip

    def forward(self, hidden_states: Sequence[torch.Tensor], inputs: torch.Tensor | None = None) -> torch.Tensor:
        x = self.read(inputs)
        return self.evidence_router(x.to(self.evidence_router[0].weight.dtype)).float()
