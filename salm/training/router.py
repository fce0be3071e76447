"""The two pieces of training that know how the ensemble's router is built: the heads as one trainable
module, and their seeded re-initialisation. Kept apart so a new router interface changes only this file."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from salm.training.config import TrainConfig, TrainingError


class _Router(nn.Module):
    """The heads as one module (what DDP wraps); the members stay outside it, as in the ensemble."""

    def __init__(self, model: Any):
        super().__init__()
        self.projection_heads = model.projection_heads
        self.__dict__["ensemble"] = model

        if model.joint_router is not None:
            self.joint_router = model.joint_router

    def forward(self, hidden: list[torch.Tensor], stats: torch.Tensor) -> torch.Tensor:
        return self.ensemble.router_logits(hidden, stats)


def _reset_heads(model: Any, cfg: TrainConfig) -> None:
    """Fresh heads from the seeded RNG, so initialisation depends on the seed alone."""
    heads = cfg.heads
    if model.head_hidden_dim != heads.hidden_dim:
        raise TrainingError(
            f"the model's heads are {model.head_hidden_dim} wide, --head_hidden_dim is {heads.hidden_dim}"
        )
    model.head_dropout = heads.dropout
    if model.router != heads.router:
        model.build_router(heads.router)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = heads.dropout
        elif m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
