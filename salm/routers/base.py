"""The router interface: one class per variant, registered by name, asked by everything that routes.

A router maps, at every position, each member's final hidden state (plus, if it says so, the members'
confidence statistics and their record on the text so far) to routing logits ``[..., M]``. It declares
which inputs it reads (:attr:`Router.reads_stats`, :attr:`Router.reads_history`), builds its own modules,
makes the per-sequence state decoding carries for it (:meth:`Router.new_state`) and tells its weights from
their tensors (:meth:`Router.matches_state`, for files saved without a config). The ensemble, feature
extraction, generation (dynamic, static, compiled), the server engine and save/load ask the router object;
none of them switches on a router's name. A new variant is one subclass decorated with
:func:`salm.routers.registry.register_router` (in PEFT's manner: a method is a class registered under its name).

Router inputs have one layout everywhere, the feature cache's (:func:`salm.confidence.stored_dim`): the
history (``2M`` floats), then the confidence statistics (``M*M + 3M + 1``). A router is handed either its
own inputs (:meth:`Router.inputs`, exactly :meth:`Router.input_width` columns, what decoding computes) or a
whole stored row (training, from the cache), and :meth:`Router.read` takes its columns from either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from salm.confidence import History, RouterState, confidence_stats, history_dim, stats_dim, stored_dim
from salm.routers.config import HeadConfig


class Router(nn.Module):
    """Per-position routing logits from the members' hidden states (and the inputs it declares it reads).

    Subclasses set :attr:`name`, the inputs they read, build their modules in ``__init__`` and implement
    :meth:`forward`; the children they register become the ensemble's (so ``state_dict`` keys are the
    children's names, e.g. ``projection_heads.<member id>...`` as saved since the seed).
    """

    name: ClassVar[str] = ""
    reads_stats: ClassVar[bool] = False  # the confidence statistics of every member's next-token distribution
    reads_history: ClassVar[bool] = False  # each member's record on the text so far (salm.confidence.History)
    layer_norm_only: ClassVar[bool] = False  # its modules have LayerNorm only (norm="batch" is for seed heads)
    # A router with a module of its own: the name of that module's first weight ([hidden_dim, F]), which tells
    # bare weights of this router (its module's name) and their hidden width (its first dimension)
    width_weight: ClassVar[str | None] = None

    def __init__(self, member_ids: Sequence[str], hidden_sizes: Sequence[int], config: HeadConfig):
        super().__init__()
        self.member_ids = list(member_ids)
        self.hidden_sizes = list(hidden_sizes)
        self.config = config

    # ------------------------------------------------------------------ what it reads
    @classmethod
    def input_width(cls, n_members: int) -> int:
        """Floats per position this router reads besides the hidden states (0: none)."""
        return (history_dim(n_members) if cls.reads_history else 0) + (stats_dim(n_members) if cls.reads_stats else 0)

    @classmethod
    def check_config(cls, config: HeadConfig) -> str | None:
        """Why ``config`` cannot build this router (a message naming the field), or None."""
        if cls.layer_norm_only and config.norm != "layer":
            return f"HeadConfig: the {cls.name} router has LayerNorm only; norm='batch' exists for seed heads"
        return None

    @classmethod
    def matches_state(cls, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``state`` (weights saved without a config) holds this router; only one router may say yes."""
        if cls.width_weight is None:
            return False
        module = cls.width_weight.split(".")[0] + "."
        return any(k.startswith(module) for k in state)

    @classmethod
    def config_of_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        """The HeadConfig fields (besides ``router``) such weights were built with, read off their tensors."""
        key = cls.width_weight
        return {"hidden_dim": state[key].shape[0]} if key is not None and key in state else {}

    def inputs(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor | None:
        """This router's inputs from the members' logits ``[..., M, V]`` and the history features ``[..., 2M]``
        (:meth:`RouterState.features`): exactly :meth:`input_width` columns, or None when it reads none."""
        if not (self.reads_stats or self.reads_history):
            return None
        parts = []
        if self.reads_history:
            if history is None:
                raise ValueError(f"the {self.name!r} router needs the members' history on the text so far (history=)")
            parts.append(history)
        if self.reads_stats:
            parts.append(confidence_stats(logits))
        return torch.cat([p.to(logits.device, torch.float32) for p in parts], -1)

    def read(self, inputs: torch.Tensor | None) -> torch.Tensor | None:
        """The columns this router reads, from its own :meth:`inputs` or a whole stored row (the feature cache)."""
        if not (self.reads_stats or self.reads_history):
            return None
        if inputs is None:
            raise ValueError(f"the {self.name!r} router needs the members' confidence statistics (stats=)")
        M = len(self.member_ids)
        own, full, n = self.input_width(M), stored_dim(M), inputs.shape[-1]
        if n == own:
            return inputs
        if n != full:
            raise ValueError(
                f"the {self.name!r} router reads {own} statistics per position (or stored rows of {full}), got {n}"
            )
        hd = history_dim(M)
        parts = ([inputs[..., :hd]] if self.reads_history else []) + ([inputs[..., hd:]] if self.reads_stats else [])
        return parts[0] if len(parts) == 1 else inputs

    def new_state(self, rows: int, device: torch.device | str | None = None) -> RouterState:
        """The per-sequence state decoding keeps for ``rows`` sequences (empty for routers without history)."""
        if self.reads_history:
            return History(rows, len(self.member_ids), device)
        return RouterState()

    def forward(self, hidden_states: Sequence[torch.Tensor], inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Per-member hidden states ``[..., H_m]`` (+ inputs, see :meth:`read`) -> routing logits ``[..., M]`` fp32."""
        raise NotImplementedError
