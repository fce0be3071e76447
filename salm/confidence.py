"""Cheap statistics of every member's next-token distribution: what a router needs to tell who *knows*.

A router that reads only each member's hidden state learns which domain a prompt is in, not which member
is sure of the next token. Every member already computes its full next-token distribution at every step,
so a few numbers summarising each one are free, and published routers (R2R, CoSD, speculative cascades)
decide from exactly such confidences.

:func:`confidence_stats` is the ONE function computing them, from logits ``[..., M, V]``; generation calls
it on the logits it samples from, feature extraction on the logits it scores the gold token with, and the
feature cache stores its output, so training and inference see the same router inputs. Per position it
returns :func:`stats_dim` ``(M) = M * M + 3 * M + 1`` floats (19 for three members), never the vocabulary:

* ``cross[m, k]`` (``M * M``): member ``m``'s log-prob of member ``k``'s argmax token; the diagonal is each
  member's top-1 log-prob, the rest says how plausible each member finds the others' choices;
* ``entropy[m]`` (``M``): the entropy of member ``m``'s distribution, in nats;
* ``margin[m]`` (``M``): top-1 minus top-2 log-prob of member ``m``;
* ``doubt[m]`` (``M``): ``log(1 - p_top1)`` of member ``m``, the log of the mass *off* its argmax. The top-1
  log-prob squeezes "sure" and "very sure" together near 0 (-0.002 vs -0.1); this spreads them apart
  (-6 vs -2.3), which is where a member that knows a fact differs from one that confidently guesses;
* ``agree`` (1): 1.0 when every member's argmax is the same token, else 0.0.

Log-probs are clamped at :data:`LOGPROB_FLOOR` so a token a member rules out (-inf, or -1e4 after
masking) does not blow up a head's input scale.
"""

from __future__ import annotations

import torch

LOGPROB_FLOOR = -30.0
"""Log-probs below this are clamped (e^-30 ~ 1e-13: 'impossible' for every purpose a router has)."""


def stats_dim(n_members: int) -> int:
    """Floats per position for ``n_members`` members."""
    return n_members * n_members + 3 * n_members + 1


def stats_names(model_ids: list[str]) -> list[str]:
    """Column names of :func:`confidence_stats`' output, in order (for reports and debugging)."""
    names = [f"logp[{m}]({k}_argmax)" for m in model_ids for k in model_ids]
    names += [f"{stat}[{m}]" for stat in ("entropy", "margin", "doubt") for m in model_ids] + ["agree"]
    return names


def confidence_stats(logits: torch.Tensor) -> torch.Tensor:
    """``[..., M, V]`` member logits -> ``[..., stats_dim(M)]`` fp32 statistics (see the module docstring)."""
    if logits.dim() < 2:
        raise ValueError(f"confidence_stats expects logits [..., M, V], got shape {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    M = logp.shape[-2]
    top = logp.topk(min(2, logp.shape[-1]), dim=-1)  # values/indices [..., M, 2]
    argmax = top.indices[..., 0]  # [..., M]
    # cross[..., m, k] = logp[..., m, argmax[..., k]]
    cross = logp.gather(-1, argmax.unsqueeze(-2).expand(*argmax.shape[:-1], M, M))
    entropy = -(logp.exp() * logp.clamp(min=-1e4)).sum(-1)
    second = top.values[..., 1] if top.values.shape[-1] > 1 else top.values[..., 0]
    margin = top.values[..., 0] - second
    doubt = torch.log(-torch.expm1(top.values[..., 0].clamp(max=-1e-30)))  # log(1 - p_top1), stable near p = 1
    agree = (argmax == argmax[..., :1]).all(-1, keepdim=True).float()
    floor = LOGPROB_FLOOR
    parts = [cross.flatten(-2).clamp(min=floor), entropy, margin.clamp(max=-floor), doubt.clamp(min=floor), agree]
    return torch.cat(parts, -1)


def disagreement(stats: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` statistics -> ``[...]`` bool: the members' argmax tokens differ (where routing matters)."""
    return stats[..., -1] < 0.5
