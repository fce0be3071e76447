"""``aware``: the confidence heads, also reading each member's record on the text so far (who *knows* it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from salm.confidence import history_dim, stats_dim
from salm.routers.confidence import ConfidenceRouter
from salm.routers.registry import register_router


@register_router
class AwareRouter(ConfidenceRouter):
    """Next-token statistics cannot tell a member that knows a fact from one that confidently guesses; how
    well each member predicted the prompt and the answer so far can (:class:`salm.confidence.History`, kept
    by decoding as this router's per-sequence state)."""

    name = "aware"
    reads_history = True

    @classmethod
    def matches_state(cls, state: Mapping[str, torch.Tensor]) -> bool:
        widths = cls.stats_widths(state)
        M = len(widths)
        joint = any(k.startswith("joint_router.") for k in state)
        return bool(widths) and not joint and set(widths) == {stats_dim(M) + history_dim(M)}
