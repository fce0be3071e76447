"""One decode step of the ensemble, and decoding over growing (dynamic) caches.

:func:`ensemble_step` is the one place where every running member's next-token scores exist at a step: the
dynamic path here (:class:`DynamicStepper`), the static and compiled paths (:mod:`salm.fast_decode`) and the
server's engine all run it, so the router sees the same inputs everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from salm.confidence import RouterState, read_mask


def ensemble_step(
    model,
    run: Sequence[int],
    heads: bool,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    caches: Sequence[Any],
    history: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Members ``run`` read ``input_ids`` -> (their last-position logits [B, R, V], routing probs [B, M] or None).

    ``caches`` holds one cache per forward, :meth:`~salm.member_forward.MemberForward.run_groups` of ``run``
    (members on one base run together, their rows in blocks of the one cache).

    The one place where every running member's next-token scores exist at a step (per-member features
    such as confidences hook in here). ``heads`` scores the members' final hidden states (all members
    must run). The dynamic and the static paths both call this; the static path compiles it whole.

    ``history`` is for routers that read the members' record on the text so far (``model.uses_history``):
    a :class:`salm.confidence.History` -- reading more than one token (a prompt into empty caches, or the
    uncached path's whole sequence) starts it over from every member's log-probs of those tokens; for one
    token the caller has already observed it -- or a tensor of its features [B, 2M] (the compiled step,
    whose inputs must be tensors).
    """
    prompt = heads and isinstance(history, RouterState) and history.reads_text and input_ids.shape[1] > 1
    hidden, logits, read = {}, {}, {}
    for group, cache in zip(model.run_groups(run), caches):
        full = prompt and not model._split_head(group[0])  # a head that cannot run apart: logits at every position
        at = None if full else slice(-1, None)
        hs, lgs, _ = model.run_members(group, input_ids, attention_mask, position_ids, cache, at)
        for i, h, lg in zip(group, hs, lgs):
            if prompt:
                read[i] = model.token_logprobs(i, h, lg if full else None, input_ids)
            hidden[i], logits[i] = h[:, -1], lg[:, -1]
    stacked = torch.stack([logits[i] for i in run], 1)  # [B, R, V]
    probs = None
    if heads:  # router input: hidden states + confidence statistics of these same logits (all members ran)
        if prompt:
            history.replay(torch.stack([read[i] for i in run], -1), read_mask(attention_mask[:, : input_ids.shape[1]]))
        feats = history.features() if isinstance(history, RouterState) else history
        with torch.no_grad():
            states = [hidden[i] for i in run]
            probs = torch.softmax(model.router_logits(states, model.confidence_features(stacked, feats)), dim=-1)
    return stacked, probs


class DynamicStepper:
    """Growing caches (``DynamicCache``) and mask; with ``use_cache=False`` every step recomputes the whole
    sequence (the reference both cached paths are tested against)."""

    def __init__(self, model, run: tuple[int, ...], heads: bool, mask: torch.Tensor, use_cache: bool):
        from transformers import DynamicCache

        self.model, self.run, self.heads, self.mask = model, run, heads, mask
        self.use_cache = use_cache
        groups = model.run_groups(run)  # one cache per forward: members on one base share it (blocks of rows)
        self.caches = [DynamicCache(config=model.members[g[0]].config) if use_cache else None for g in groups]
        self.history = model.new_history(mask.shape[0]) if heads else None

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.ids = ids
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        return self._step(ids, pos)

    def step(
        self, token: torch.Tensor, finished: Sequence[bool] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        if self.use_cache:
            if self.history is not None:
                self.history.observe(self.logits, token)
            feed_ids, feed_pos = token[:, None], self.mask.sum(-1, keepdim=True) - 1
        else:  # the history starts over from the whole sequence too
            self.ids = torch.cat([self.ids, token[:, None]], dim=1)
            feed_ids, feed_pos = self.ids, (self.mask.cumsum(-1) - 1).clamp(min=0)
        return self._step(feed_ids, feed_pos)

    def _step(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.logits, probs = ensemble_step(self.model, self.run, self.heads, ids, self.mask, pos, self.caches,
                                           self.history)  # fmt: skip
        return self.logits, probs


def block_rows(index: torch.Tensor, blocks: int, rows: int) -> torch.Tensor:
    """Row ``index`` of a batch of ``rows`` rows, in a cache holding ``blocks`` member-major copies of it (members
    on one base run together: :meth:`~salm.member_forward.MemberForward.run_members`)."""
    if blocks == 1:
        return index
    return torch.cat([index + b * rows for b in range(blocks)])


def join_blocks(old: torch.Tensor, new: torch.Tensor, blocks: int) -> torch.Tensor:
    """Rows of two caches' tensors of ``blocks`` member-major blocks each, joined block by block."""
    if blocks == 1:
        return torch.cat([old, new], 0)
    a, b = old.unflatten(0, (blocks, -1)), new.unflatten(0, (blocks, -1))
    return torch.cat([a, b], 1).flatten(0, 1)
