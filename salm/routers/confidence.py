"""``confidence``: the seed's heads, each also reading the statistics of every member's next-token distribution."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from salm.confidence import stats_dim
from salm.routers.registry import register_router
from salm.routers.seed import SeedRouter


@register_router
class ConfidenceRouter(SeedRouter):
    """A hidden state says which domain a text is in, not which member is sure of the next token; the
    statistics (:func:`salm.confidence.confidence_stats`) do, through a linear map added to each head's first layer."""

    name = "confidence"
    reads_stats = True

    @classmethod
    def matches_state(cls, state: Mapping[str, torch.Tensor]) -> bool:
        widths = cls.stats_widths(state)
        joint = any(k.startswith("joint_router.") for k in state)
        return bool(widths) and not joint and set(widths) == {stats_dim(len(widths))}
