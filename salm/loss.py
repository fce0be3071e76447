"""The perfect alignment loss: the NLL of the gold token under the router-weighted mixture of members."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # what is minimised: nll - entropy_weight * entropy
    nll: torch.Tensor  # mean -log sum_m pi_m p_m(gold); exp(nll) is the mixture's perplexity
    entropy: torch.Tensor  # mean router entropy H(pi) in nats
    n_tokens: int


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
