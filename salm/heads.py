"""Routing heads: a member's hidden state (and, for the ``confidence``/``joint`` routers, every member's
confidence statistics, :mod:`salm.confidence`) -> routing scores.

Router variants (``salm train --router``, recorded as ``heads.router`` in ``salm_config.json``):

* ``seed``: one :class:`ScalarProjectionHead` per member on its own final hidden state (the seed's heads);
* ``confidence``: the same heads, each also reading the statistics of every member's next-token
  distribution through an extra linear map added to its first layer (``stats_projection``);
* ``aware``: the ``confidence`` heads also reading each member's record on the text so far
  (:class:`salm.confidence.History`): who predicted the prompt and the answer so far well, i.e. who *knows* it;
* ``joint``: one :class:`JointRouter` scoring all members at once from every member's hidden state and
  the statistics (``projection_heads.<id>`` then maps member ``id``'s hidden state into the shared trunk).

:class:`HeadConfig` is the one description of the heads (sizes, dropout, norm, router variant) and the one
place their defaults live, in the style of PEFT's ``LoraConfig``: the ensemble is built from it,
``save_pretrained`` writes it as ``"heads"`` in ``salm_config.json`` and ``from_pretrained`` reads it back.
A new router option is one field here (checked in ``__post_init__``), read where the heads are built.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("seed", "confidence", "joint", "aware")
"""Router variants; folders saved before ``router`` existed in ``salm_config.json`` hold ``seed`` heads."""

NORMS = ("layer", "batch")
"""Head normalisation: ``layer`` for every new head; ``batch`` only to run the seed's BatchNorm heads."""


class HeadConfigError(ValueError):
    """A head setting that is unknown or out of range; the message names the field."""


@dataclass(frozen=True)
class HeadConfig:
    """What the routing heads are: saved beside their weights, so a folder rebuilds exactly its heads.

    Frozen: change a field with :func:`dataclasses.replace`, which checks the new value like the constructor.
    The defaults here are the only head defaults in saLM (the ensemble, ``from_pretrained`` and training
    take them from this class). ``router`` defaults to ``seed``, what an untrained ensemble and the seed's
    heads are; ``salm train`` picks its own router (its ``--router`` default).
    """

    hidden_dim: int = 256  # width of the first layer (the second has hidden_dim // 2 units)
    dropout: float = 0.1  # between the layers, only while training
    norm: str = "layer"  # one of NORMS
    router: str = "seed"  # one of ROUTERS

    def __post_init__(self) -> None:
        h, p = self.hidden_dim, self.dropout
        if not isinstance(h, int) or isinstance(h, bool) or h < 2:  # 2 // 2 = 1 unit is the least that reads
            raise HeadConfigError(f"HeadConfig.hidden_dim must be an integer >= 2, got {h!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or not 0 <= p < 1:
            raise HeadConfigError(f"HeadConfig.dropout must be a number in [0, 1), got {p!r}")
        if self.norm not in NORMS:
            raise HeadConfigError(f"HeadConfig.norm must be one of {', '.join(NORMS)}; got {self.norm!r}")
        if self.router not in ROUTERS:
            raise HeadConfigError(f"HeadConfig.router must be one of {', '.join(ROUTERS)}; got {self.router!r}")
        if self.router == "joint" and self.norm != "layer":
            raise HeadConfigError("HeadConfig: the joint router has LayerNorm only; norm='batch' exists for seed heads")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (what ``salm_config.json`` holds under ``"heads"``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HeadConfig:
        """The inverse of :meth:`to_dict`; missing fields take the defaults, unknown ones are an error."""
        if not isinstance(values, Mapping):
            raise HeadConfigError(f"HeadConfig needs a JSON object of fields, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise HeadConfigError(f"unknown HeadConfig field(s) {unknown} (known: {', '.join(known)})")
        return cls(**values)


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


class JointRouter(nn.Module):
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
