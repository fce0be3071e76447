"""The training objective: the perfect alignment loss (the NLL of the gold token under the router-weighted
mixture of members) and the terms that shape it, each set by one field of :class:`LossConfig`.

A new loss term is one field of :class:`LossConfig` (its help text in the field's metadata becomes a
``salm train`` flag, its default -- which must mean "off" -- is what checkpoints written before it are
resumed with) and one function here, applied in :func:`training_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # what is minimised: nll - entropy_weight * entropy
    nll: torch.Tensor  # mean -log sum_m pi_m p_m(gold); exp(nll) is the mixture's perplexity
    entropy: torch.Tensor  # mean router entropy H(pi) in nats
    n_tokens: int


@dataclass
class LossConfig:
    """The objective's settings (``salm train``'s loss flags, same names).

    Field metadata: ``help`` is the flag's help text; ``resume=False`` marks a setting that does not change
    the objective (so ``--resume`` does not compare it); ``flag=False`` a setting with a hand-written flag.
    """

    entropy_weight: float = field(default=0.1, metadata={"help": "router entropy bonus (>= 0)"})
    disagreement_weight: float = field(
        default=1.0,
        metadata={
            "help": "loss weight of positions where the members' argmax tokens differ (1 = the plain mixture NLL)"
        },
    )
    allow_negative_entropy_weight: bool = field(
        default=False, metadata={"resume": False, "help": "accept --entropy_weight < 0 (an entropy penalty)"}
    )

    def problems(self) -> list[str]:
        """Every bad setting, as the flag's message (checked before any work: a NaN weight trains NaN heads)."""
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", float) and (
                not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
            ):
                out.append(f"--{f.name} must be a finite number, got {v!r}")
        if out:
            return out
        if self.entropy_weight < 0 and not self.allow_negative_entropy_weight:
            out.append(
                f"--entropy_weight must be >= 0 (a negative weight rewards confident routing; pass "
                f"--allow_negative_entropy_weight if that is meant), got {self.entropy_weight}"
            )
        if self.disagreement_weight <= 0:
            out.append(f"--disagreement_weight must be > 0, got {self.disagreement_weight}")
        return out

    @classmethod
    def resume_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata.get("resume", True))

    @classmethod
    def resume_defaults(cls) -> dict[str, object]:
        """What a checkpoint written before a term existed was trained with: the term's default (off)."""
        return {f.name: f.default for f in fields(cls) if f.metadata.get("resume", True)}


def training_loss(
    cfg: LossConfig, router_logits: torch.Tensor, gold_logprobs: torch.Tensor, stats: torch.Tensor
) -> LossOutput:
    """The loss one optimizer step minimises: the mixture NLL with every term ``cfg`` switches on."""
    weights = disagreement_weights(stats, cfg.disagreement_weight)
    return perfect_alignment_loss(router_logits, gold_logprobs, None, cfg.entropy_weight, weights)


def validation_loss(cfg: LossConfig, router_logits: torch.Tensor, gold_logprobs: torch.Tensor) -> LossOutput:
    """The loss reported on validation: unweighted, so runs with different weightings compare."""
    return perfect_alignment_loss(router_logits, gold_logprobs, None, cfg.entropy_weight)


def perfect_alignment_loss(
    router_logits: torch.Tensor,
    gold_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    entropy_weight: float = 0.1,
    weights: torch.Tensor | None = None,
) -> LossOutput:
    """Mean over loss positions of ``-log sum_m pi_m p_m(gold) - entropy_weight * H(pi)``.

    ``router_logits`` and ``gold_logprobs`` are [..., M]; ``mask`` [...] selects loss positions.
    Computed in log space (logsumexp), so a member giving the gold token probability 1e-30 neither
    underflows nor needs the seed's ``+1e-10``. The seed's sign: entropy_weight > 0 rewards router
    entropy, which keeps heads from collapsing onto one member early in training.

    ``weights`` [...] (e.g. :func:`disagreement_weights`) turn the mean minimised into a weighted mean;
    the reported ``nll`` and ``entropy`` stay plain means, so runs with and without weights compare.
    """
    log_pi = F.log_softmax(router_logits.float(), dim=-1)
    nll = -torch.logsumexp(log_pi + gold_logprobs.float(), dim=-1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    if mask is None:
        mask = torch.ones_like(nll, dtype=torch.bool)
    mask = mask.bool()
    n = int(mask.sum())
    denom = max(n, 1)
    nll_mean = nll.masked_fill(~mask, 0.0).sum() / denom
    ent_mean = entropy.masked_fill(~mask, 0.0).sum() / denom
    if weights is None:
        return LossOutput(nll_mean - entropy_weight * ent_mean, nll_mean, ent_mean, n)
    w = weights.float().masked_fill(~mask, 0.0)
    wsum = w.sum().clamp(min=1e-12)
    loss = ((nll - entropy_weight * entropy) * w).sum() / wsum
    return LossOutput(loss, nll_mean, ent_mean, n)


def disagreement_weights(stats: torch.Tensor, weight: float) -> torch.Tensor | None:
    """Per-position loss weights: ``weight`` where the members' argmax tokens differ, 1 elsewhere.

    Where every member predicts the same token the routing choice barely changes the output; where they
    disagree it decides it. ``weight == 1`` is the plain mixture NLL (returns None).
    """
    from salm.confidence import disagreement

    if weight == 1.0:
        return None
    return 1.0 + (weight - 1.0) * disagreement(stats).float()
