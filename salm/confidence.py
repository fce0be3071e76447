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


# ---------------------------------------------------------------------------------------------- history
HISTORY_DECAY = 0.8
"""Weight of the past in the recent-record average (``0.8``: about the last five tokens)."""


def history_dim(n_members: int) -> int:
    """Floats per position of :func:`history_features`: each member's mean and recent log-prob."""
    return 2 * n_members


def history_names(model_ids: list[str]) -> list[str]:
    return [f"{stat}[{m}]" for stat in ("record", "recent") for m in model_ids]


def read_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> where a token has a log-prob given those before it (what a :class:`History` reads): it and
    its predecessor are real tokens, not padding."""
    seen = attention_mask.bool()
    return torch.cat([torch.zeros_like(seen[:, :1]), seen[:, 1:] & seen[:, :-1]], 1)


def stored_dim(n_members: int) -> int:
    """Floats per position the feature cache stores: the history, then the statistics (every router's input)."""
    return history_dim(n_members) + stats_dim(n_members)


class RouterState:
    """A router's per-sequence state, carried by decoding through the prefill, every step, and the rows
    joining (:meth:`extend`) and leaving (:meth:`select`) a running batch; :meth:`features` is what the router
    reads of it. This base keeps nothing: the state of routers that read only the current position.

    ``reads_text``: the state reads every member's log-prob of the prompt's tokens at the prefill
    (:meth:`replay`), which decoding then computes (it costs one LM-head pass over the prompt).
    """

    reads_text = False

    def replay(self, logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """Start over and read a whole text (``logp`` [rows, L, M], ``valid`` [rows, L])."""
        return None

    def observe(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add the chosen ``tokens`` [rows] under the step's member ``logits`` [rows, M, V]."""

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder) rows: ``index`` [rows'] as ``Tensor.index_select`` takes it."""

    def extend(self, other: RouterState) -> None:
        """Append ``other``'s rows (a server admitting requests into a running batch)."""

    def features(self) -> torch.Tensor | None:
        """[rows, F]: what the router reads of this state, or None."""
        return None


class History(RouterState):
    """Each member's record on the text so far: how well it predicted every token already read or written.

    The statistics above describe one next-token distribution; they cannot tell a member that *knows* a
    fact from one that confidently guesses (both put ~all mass on one token). The text before the answer
    can: a member fine-tuned on facts about a person predicts that person's name far better than one that
    never saw it, and a member fluent in the current passage keeps predicting it well. Per row and member it
    keeps the sum of log-probs of the tokens seen (-> the mean, ``record``) and an exponential average of
    the latest ones (``recent``, decay :data:`HISTORY_DECAY`): ``2 * M`` floats, both 0 before any token.

    Generation resets it from the members' log-probs of the prompt's tokens (prefill), then observes
    (:meth:`observe`) each chosen token under the logits it was chosen from; feature extraction replays the
    same recurrence over the gold text (:func:`history_over`), so training and decoding see identical inputs.
    """

    reads_text = True

    def __init__(self, rows: int, n_members: int, device: torch.device | str | None = None):
        self.state = torch.zeros(rows, 2 * n_members + 1, device=device)  # sum[M], recent[M], count[1]
        self.M = n_members

    def update(self, logp: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add one token per row: ``logp`` [rows, M] (each member's log-prob of it); rows not ``valid`` keep theirs."""
        M, s = self.M, self.state
        logp = logp.float().clamp(min=LOGPROB_FLOOR)
        count = s[:, -1:]
        recent = torch.where(count > 0, HISTORY_DECAY * s[:, M : 2 * M] + (1 - HISTORY_DECAY) * logp, logp)
        new = torch.cat([s[:, :M] + logp, recent, count + 1], -1)
        self.state = new if valid is None else torch.where(valid[:, None], new, s)

    def observe(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add the chosen ``tokens`` [rows] under the step's member ``logits`` [rows, M, V]."""
        logits = logits.float()
        picked = logits.gather(-1, tokens.to(logits.device)[:, None, None].expand(-1, logits.shape[1], 1))
        self.update((picked.squeeze(-1) - logits.logsumexp(-1)).to(self.state.device))

    def features(self) -> torch.Tensor:
        """[rows, 2M]: mean log-prob so far (``record``) and the recent average, 0 before any token."""
        M, s = self.M, self.state
        count = s[:, -1:]
        return torch.cat([s[:, :M] / count.clamp(min=1), s[:, M : 2 * M]], -1)

    def replay(self, logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Start over and read a whole text: ``logp`` [rows, L, M] (position ``t``: each member's log-prob of
        token ``t`` given those before it), ``valid`` [rows, L] where that exists -> [rows, L, 2M] the features
        after each position (what a router predicting the next token sees)."""
        self.state = torch.zeros_like(self.state)
        out = []
        for t in range(logp.shape[1]):
            self.update(logp[:, t], valid[:, t])
            out.append(self.features())
        return torch.stack(out, 1) if out else logp.new_zeros(logp.shape[0], 0, 2 * self.M)

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder) rows: ``index`` [rows'] as ``Tensor.index_select`` takes it."""
        self.state = self.state.index_select(0, index.to(self.state.device))

    def extend(self, other: RouterState) -> None:
        """Append ``other``'s rows (a server admitting requests into a running batch)."""
        self.state = torch.cat([self.state, other.state.to(self.state.device)], 0)


def history_over(logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Teacher forced: :meth:`History.replay` on a fresh history (the same float operations as decoding)."""
    return History(logp.shape[0], logp.shape[-1], logp.device).replay(logp, valid)
