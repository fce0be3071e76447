"""Running the frozen members: one member's forward, every member over a batch, and the teacher-forced
features training and scoring read (hidden states, gold log-probs, router statistics).

:class:`MemberForward` is a mixin of :class:`salm.ensemble.MultiModelWithScalarHeads`: it uses the ensemble's
``members``, ``device``, ``vocab_size``, ``_cache_kwarg`` and router (for the statistics' layout only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from salm.confidence import confidence_stats, history_over, read_mask, stored_dim

# Causal LMs whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)``:
# for these we run the decoder and the LM head apart, which lets generation project only the last
# position and hands the heads the final hidden state without keeping every layer's activations.
_SPLIT_SAFE = {
    "qwen2",
    "qwen3",
    "llama",
    "mistral",
    "qwen2_moe",
    "qwen3_moe",
    "phi3",
    "olmo",
    "olmo2",
    "smollm3",
}
# LM-head rows projected at once for gold log-probs (bounds the [rows, V] fp32 buffer to ~256 MB).
_LOGIT_ELEMENTS = 1 << 26


@dataclass
class MemberOutputs:
    """What the frozen members contribute at each position: hidden state and next-token scores."""

    hidden_states: list[torch.Tensor]  # per member [B, L, H_m], detached, on the heads' device
    logits: list[torch.Tensor]  # per member [B, L', V] fp32 (L' = positions asked for), on the heads' device
    caches: list[Any] | None = None


class MemberForward:
    """The members' side of the ensemble: forwards, log-probs and features (no routing here)."""

    def member_device(self, i: int) -> torch.device:
        return next(self.members[i].parameters()).device

    def _split_head(self, i: int) -> bool:
        """Whether member ``i``'s decoder and LM head can run apart (see ``_SPLIT_SAFE``)."""
        m = self.members[i]
        return m.config.model_type in _SPLIT_SAFE and getattr(m, "base_model", m) is not m

    def run_groups(self, run: Sequence[int]) -> list[tuple[int, ...]]:
        """``run`` split into the sets of members that run in one forward: members on one base with LoRA
        adapters (:mod:`salm.adapters`) together, every other member alone; in order of first appearance."""
        groups: dict[int, list[int]] = {}
        for i in run:
            shared = getattr(self.members[i], "salm_lora", None) is not None
            groups.setdefault(id(self.members[i]) if shared else -1 - i, []).append(i)
        return [tuple(g) for g in groups.values()]

    def run_member(
        self,
        i: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
        logits_positions: slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One member forward: (final hidden [B, L, H], fp32 logits [B, L', V] for ``logits_positions``, cache)."""
        hidden, logits, cache = self._forward((i,), input_ids, attention_mask, position_ids, cache, logits_positions)
        return hidden[0], logits[0], cache

    def run_members(
        self,
        group: Sequence[int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
        logits_positions: slice | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
        """The members of ``group`` (one of :meth:`run_groups`) over one batch in one forward: per member its final
        hidden [B, L, H] and fp32 logits [B, L', V] for ``logits_positions``; the cache holds ``len(group)``
        blocks of the batch's rows, member-major (:func:`salm.decode_step.block_rows` maps row indices into it)."""
        if len(group) == 1:
            h, lg, cache = self.run_member(group[0], input_ids, attention_mask, position_ids, cache, logits_positions)
            return [h], [lg], cache
        return self._forward(group, input_ids, attention_mask, position_ids, cache, logits_positions)

    def _forward(
        self,
        group: Sequence[int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        logits_positions: slice | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
        first = group[0]
        model = self.members[first]
        dev = self.member_device(first)
        k = len(group)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return (t if k == 1 else t.repeat(k, *([1] * (t.dim() - 1)))).to(dev)

        kw = {
            "input_ids": rows(input_ids),
            "attention_mask": rows(attention_mask),
            "position_ids": rows(position_ids),
            "use_cache": cache is not None,
        }
        if cache is not None:
            kw[self._cache_kwarg[first]] = cache
        sl = logits_positions if logits_positions is not None else slice(None)
        bank = getattr(model, "salm_lora", None)
        layout = bank.blocks([self.adapter_names[i] for i in group]) if bank is not None else contextlib.nullcontext()
        with torch.no_grad(), layout:
            if self._split_head(first):
                out = model.base_model(**kw)
                hidden = out.last_hidden_state
                logits = model.get_output_embeddings()(hidden[:, sl])
            else:
                out = model(**kw, output_hidden_states=True)
                hidden = out.hidden_states[-1]
                logits = out.logits[:, sl]
        logits = logits[..., : self.vocab_size].float().to(self.device)
        hidden = hidden.detach().to(self.device)
        return list(hidden.chunk(k)), list(logits.chunk(k)), cache

    def member_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_positions: slice | None = None,
    ) -> MemberOutputs:
        """Run every frozen member over a (left- or right-padded) batch."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden, logits = [None] * len(self.members), [None] * len(self.members)
        for group in self.run_groups(range(len(self.members))):
            hs, lgs, _ = self.run_members(group, input_ids, attention_mask, position_ids, None, logits_positions)
            for i, h, lg in zip(group, hs, lgs):
                hidden[i], logits[i] = h, lg
        return MemberOutputs(hidden, logits)

    def gold_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Every member's final hidden states ``[B, L, H_m]``, its log-prob of the gold next token ``[B, L, M]``
        (0 where there is none) and where there is one, ``mask`` ``[B, L]``; see :meth:`member_features`."""
        hidden, gold, _, mask = self.member_features(input_ids, attention_mask, labels)
        return hidden, gold, mask

    def member_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`gold_logprobs` plus the router statistics ``[B, L, F]`` (0 where masked): each member's
        record on the text before (:class:`~salm.confidence.History`), then the confidence statistics.

        ``labels`` follow Hugging Face's convention (aligned with ``input_ids``, -100 = ignored; position t
        carries log p_m(labels[t + 1])). Every real position goes through the LM heads once, in chunks of
        positions holding every member's logits at once (the statistics compare members), so no
        ``[B, L, V]`` logits are materialised for members whose head runs apart (all common decoders): each
        chunk gives every member's log-prob of the next token (the record) and, at labelled positions, of the
        gold token and the statistics.
        """
        labels, ids = labels.to(self.device), input_ids.to(self.device)
        nxt = torch.full_like(labels, -100)
        nxt[:, :-1] = labels[:, 1:]
        mask = nxt != -100
        seen = read_mask(attention_mask.to(self.device))  # token t has a log-prob given those before it
        after = torch.zeros_like(seen)
        after[:, :-1] = seen[:, 1:]  # position t predicts a real token t + 1
        rows_mask = mask | after
        following = torch.zeros_like(ids)
        following[:, :-1] = ids[:, 1:]
        following, targets, labelled = following[rows_mask], nxt[rows_mask], mask[rows_mask]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        M = len(self.members)
        hidden: list[Any] = [None] * M
        sources: list[Any] = [None] * M
        for group in self.run_groups(range(M)):
            split = self._split_head(group[0])
            at = slice(0, 0) if split else None
            hs, lgs, _ = self.run_members(group, input_ids, attention_mask, position_ids, None, at)
            for i, h, lg in zip(group, hs, lgs):
                hidden[i] = h
                sources[i] = (h[rows_mask], self.members[i].get_output_embeddings()) if split else (lg[rows_mask], None)
        n = int(rows_mask.sum())
        rows = max(1, _LOGIT_ELEMENTS // (self.vocab_size * M))
        next_parts, gold_parts, stat_parts = [], [], []
        with torch.no_grad():
            for s in range(0, n, rows):
                chunk = []
                for i, (x, head) in enumerate(sources):
                    if head is None:
                        lg = x[s : s + rows]
                    else:
                        lg = head(x[s : s + rows].to(self.member_device(i)))[..., : self.vocab_size].float()
                    chunk.append(lg.to(self.device))
                lg = torch.stack(chunk, dim=1)  # [rows, M, V]
                lse = lg.logsumexp(-1)
                t = following[s : s + rows]
                next_parts.append(lg.gather(-1, t[:, None, None].expand(-1, M, 1)).squeeze(-1) - lse)
                sel = labelled[s : s + rows]
                lg, lse, t = lg[sel], lse[sel], targets[s : s + rows][sel]
                gold_parts.append(lg.gather(-1, t[:, None, None].expand(-1, M, 1)).squeeze(-1) - lse)
                stat_parts.append(confidence_stats(lg))
        gold = torch.zeros(*mask.shape, M, device=self.device)
        stats = torch.zeros(*mask.shape, stored_dim(M), device=self.device)
        if int(mask.sum()):
            predicted = torch.zeros(*mask.shape, M, device=self.device)  # position t: log p_m(token t + 1)
            predicted[rows_mask] = torch.cat(next_parts)
            read = torch.zeros_like(predicted)  # position t: log p_m(token t), what the record reads
            read[:, 1:] = predicted[:, :-1]
            history = history_over(read, seen)  # [B, L, 2M]: the record after reading token t
            gold[mask] = torch.cat(gold_parts).float()
            stats[mask] = torch.cat([history[mask], torch.cat(stat_parts)], -1)
        return hidden, gold, stats, mask

    def token_logprobs(self, i: int, hidden: torch.Tensor, logits: torch.Tensor | None, input_ids: torch.Tensor):
        """Member ``i``'s log-prob of each token given those before it: ``[B, L]`` (position 0: 0).

        From its final hidden states ``[B, L, H]`` through its LM head in chunks of positions (no ``[B, L, V]``
        tensor), or from ``logits`` ``[B, L, V]`` when its head cannot run apart.
        """
        B, L = input_ids.shape
        out = torch.zeros(B, L, device=self.device)
        if L < 2:
            return out
        nxt = input_ids[:, 1:].to(self.device)
        head = None if logits is not None else self.members[i].get_output_embeddings()
        rows = max(1, _LOGIT_ELEMENTS // (self.vocab_size * B))
        with torch.no_grad():
            for s in range(0, L - 1, rows):
                e = min(s + rows, L - 1)
                if head is None:
                    lg = logits[:, s:e]
                else:
                    lg = head(hidden[:, s:e].to(self.member_device(i)))[..., : self.vocab_size].float()
                lg = lg.to(self.device)
                out[:, s + 1 : e + 1] = lg.gather(-1, nxt[:, s:e, None]).squeeze(-1) - lg.logsumexp(-1)
        return out
