"""Static-cache decoding: preallocated KV caches per member and a fixed-shape step that ``torch.compile`` can capture.

The dynamic path (``salm.generation``) grows each member's ``DynamicCache`` and its attention mask by one
column per token, so every step has new shapes and pays Python and kernel-launch overhead per op. Here each
member gets a Hugging Face ``StaticCache`` of a fixed length and the step's inputs have fixed shapes:

- the new token ``[B, 1]``, its position ``[B, 1]`` (per row: left padding shifts positions) and one
  attention mask ``[B, L]`` built once per batch — zeros on the prompt's left padding, ones everywhere
  else. Slots beyond the current position are hidden by the causal mask (the cache's own write counter),
  so the mask never changes during decoding.
- shape buckets keep the number of compiled graphs small: the cache length ``L`` is rounded up to a
  power of two (at least 32) up to 256 and to a multiple of 256 beyond, capped at the members' context
  (:func:`cache_length`), and, when compiling, the batch is padded to a power of two with dummy rows
  whose results are dropped. A new bucket pays one warm-up
  (compilation, and on CUDA the graph capture), timed and kept in :func:`warmup_report`.

The step itself is :func:`salm.decode_step.ensemble_step` — the very function the dynamic path runs (every
routed member's forward, their last-position logits and the heads) — compiled whole with
``torch.compile`` (``mode="reduce-overhead"`` on CUDA, i.e. CUDA graphs; the default mode elsewhere).
The prefill runs eagerly (its shape changes with every prompt width). Where ``torch.compile`` is missing or
fails, decoding goes on uncompiled with the same static caches after one warning.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from salm.decode_step import block_rows, ensemble_step

logger = logging.getLogger(__name__)

CACHE_LEN_MIN = 32  # the smallest static cache
CACHE_LEN_STEP = 256  # beyond this, cache lengths are multiples of it


def cache_length(needed: int, context: int | None) -> int:
    """The static cache length for ``needed`` slots, never beyond the context: the next power of two from
    :data:`CACHE_LEN_MIN` up to :data:`CACHE_LEN_STEP`, then the next multiple of it.

    Attention reads the whole static cache at every step, so a short generation in a long cache pays for
    empty slots (a 25-token batch of 8 in a 256-slot cache decoded 17% slower than the members' own
    static ``generate``, sized to the sequence; in a 32-slot cache 2% faster, ``benchmarks/bench_decode.py``).
    Powers of two keep that waste under 2x for short sequences, multiples of 256 under 256 slots for long
    ones, and either way an evaluation compiles for few distinct lengths.
    """
    if needed <= CACHE_LEN_STEP:
        length = max(CACHE_LEN_MIN, 1 << (needed - 1).bit_length())
    else:
        length = -(-needed // CACHE_LEN_STEP) * CACHE_LEN_STEP
    return max(needed, min(length, context)) if context else length


def batch_bucket(batch: int, compiled: bool) -> int:
    """Rows actually run: the next power of two when compiling (one graph serves many batch sizes), else ``batch``."""
    return 1 << (batch - 1).bit_length() if compiled else batch


@dataclass
class Warmup:
    """One shape bucket's first compiled call (compilation and, on CUDA, graph capture)."""

    members: tuple[str, ...]
    batch: int
    cache_len: int
    seconds: float


def _state(model) -> dict[str, Any]:
    """Per-ensemble state kept across ``generate`` calls: caches, compiled steps, warm-ups (not module state)."""
    return model.__dict__.setdefault(
        "_fast_decode",
        {
            "caches": {},
            "in_use": set(),
            "lock": threading.Lock(),
            "compiled": {},
            "warm": set(),
            "report": [],
            "compile_failed": None,
        },
    )


def warmup_report(model) -> list[Warmup]:
    """Every warm-up this ensemble has paid so far (one per member set and shape bucket)."""
    return list(_state(model)["report"])


def compile_available() -> str | None:
    """None when ``torch.compile`` can be tried, else why not."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        importlib.import_module("torch._dynamo")
    except Exception as e:  # noqa: BLE001 - any import problem means no compilation
        return f"torch._dynamo cannot be imported ({e})"
    return None


def _caches(model, run: tuple[int, ...], batch: int, length: int) -> tuple[list[Any], list[tuple[Any, int, int]]]:
    """Static caches for members ``run`` at (batch, length) and the keys taken (give them back with
    :func:`_release`). Kept caches are reused across calls and reset; one already in use by another
    decoding of this ensemble (another thread, a server) is never shared: that caller gets a private one."""
    from transformers import StaticCache

    state = _state(model)
    store, in_use, taken, out = state["caches"], state["in_use"], [], []
    with state["lock"]:
        if len(store) > 4 * len(model.members):  # several buckets seen: keep memory bounded, drop the older ones
            for key in [k for k in store if k not in in_use]:
                del store[key]
        for group in model.run_groups(run):  # one cache per forward: members on one base share it
            key = (group, batch, length)
            config = model.members[group[0]].config
            if key in in_use:
                out.append(StaticCache(config=config, max_cache_len=length))
                continue
            cache = store.get(key)
            if cache is None:
                cache = store[key] = StaticCache(config=config, max_cache_len=length)
            else:
                cache.reset()
            in_use.add(key)
            taken.append(key)
            out.append(cache)
    return out, taken


def _release(model, keys: list[tuple[Any, int, int]]) -> None:
    state = _state(model)
    with state["lock"]:
        state["in_use"].difference_update(keys)


def _compiled_step(model, run: tuple[int, ...], heads: bool):
    """``ensemble_step`` for members ``run`` compiled once per member set (shapes guard the recompiles)."""
    state = _state(model)
    key = (run, heads)
    fn = state["compiled"].get(key)
    if fn is None:
        device = model.member_device(run[0])
        mode = "reduce-overhead" if device.type == "cuda" else None

        def step(ids, mask, pos, caches, history=None):  # history: the features tensor (inputs must be tensors)
            return ensemble_step(model, run, heads, ids, mask, pos, caches, history)

        dynamo_config = importlib.import_module("torch._dynamo").config
        # Each (batch, cache length) bucket is one more graph of the same function; allow a few dozen.
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
        fn = state["compiled"][key] = torch.compile(step, mode=mode, dynamic=False, fullgraph=False)
    return fn


class StaticStepper:
    """Prefill and fixed-shape decode steps over static caches for the members in ``run``.

    ``steps`` is the number of tokens the caller may ask for; the cache holds the prompt plus every fed token
    (``width + steps - 1`` slots), so its positions can never overrun (checked before every step).
    Outputs are ``(logits [B, R, V], routing probs [B, M] or None)`` for the caller's rows only; on CUDA the
    logits live in the captured graph's buffers and hold until the next step.
    """

    def __init__(self, model, run: tuple[int, ...], heads: bool, mask: torch.Tensor, steps: int, compile: bool):
        self.model, self.run, self.heads = model, run, heads
        state = _state(model)
        if compile and not state["compile_failed"]:
            why_not = compile_available()
            if why_not:
                logger.warning("torch.compile unavailable (%s): decoding with static caches, uncompiled", why_not)
                state["compile_failed"] = why_not
        self.compile = compile and not state["compile_failed"]
        self.rows, width = mask.shape
        self.batch = batch_bucket(self.rows, self.compile)
        self.length = cache_length(width + steps - 1, model.context_length)
        self.fed = 0  # cache slots written so far
        if self.batch > self.rows:  # dummy rows: one real token each (no fully masked attention row)
            dummy = torch.zeros(self.batch - self.rows, width, dtype=mask.dtype, device=mask.device)
            dummy[:, -1] = 1
            mask = torch.cat([mask, dummy], 0)
        self.prompt_mask = mask
        self.mask = torch.ones(self.batch, self.length, dtype=mask.dtype, device=mask.device)
        self.mask[:, :width] = mask
        self.pos = mask.sum(-1, keepdim=True)  # position of the first generated token, per row
        self.caches, self._keys = _caches(model, run, self.batch, self.length)
        self.live = torch.arange(self.rows, device=mask.device)  # caller rows in the batch, in slot order
        self.history = model.new_history(self.batch) if heads else None
        self._fn = _compiled_step(model, run, heads) if self.compile else None

    def close(self) -> None:
        """Give the caches back for the next batch (decode_steps calls it however decoding ends)."""
        _release(self.model, self._keys)
        self._keys = []

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The left-padded prompt, eagerly (its width changes with every batch)."""
        ids = self._pad_rows(ids)
        pos = (self.prompt_mask.cumsum(-1) - 1).clamp(min=0)
        self._check_room(ids.shape[1])
        return self._trim(ensemble_step(self.model, self.run, self.heads, ids, self.mask, pos, self.caches,
                                        self.history))  # fmt: skip

    def step(
        self, token: torch.Tensor, finished: Sequence[bool] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per row (``token`` [rows]) at fixed shapes; compiled when asked.

        Rows marked ``finished`` stop costing work where the shape allows: once the live rows fit a smaller
        batch bucket, they move (cache rows copied) into that bucket. Outputs keep the caller's ``rows``
        order; a finished row's outputs are those of a live row (the caller ignores them).
        """
        self._check_room(1)
        if self.history is not None:  # every slot's chosen token, under the logits it was chosen from
            self.history.observe(self.logits, self._pad_rows(token[self.live][:, None])[:, 0])
        if finished is not None:
            self._shrink(finished)
        ids, pos = self._pad_rows(token[self.live][:, None]), self.pos
        self.pos = self.pos + 1
        if self._fn is not None:
            out = self._compiled(ids, pos)
            if out is not None:
                return self._trim(out)
        feats = None if self.history is None else self.history.features()
        return self._trim(ensemble_step(self.model, self.run, self.heads, ids, self.mask, pos, self.caches, feats))

    def _check_room(self, n: int) -> None:
        if self.fed + n > self.length:
            raise RuntimeError(f"static cache of {self.length} slots is full: cannot write {n} more after {self.fed}")
        self.fed += n

    def _pad_rows(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        if self.batch > n:
            ids = torch.cat([ids, ids[-1:].expand(self.batch - n, -1)], 0)
        return ids

    def _shrink(self, finished: Sequence[bool]) -> None:
        """Move the live rows into a smaller batch bucket when they fit one (the cache rows are copied)."""
        live = [r for r in self.live.tolist() if not finished[r]]
        if not live or batch_bucket(len(live), self.compile) >= self.batch:
            return
        where = {r: k for k, r in enumerate(self.live.tolist())}  # caller row -> slot in the current batch
        batch = batch_bucket(len(live), self.compile)
        sel = torch.tensor([where[r] for r in live] + [where[live[-1]]] * (batch - len(live)), device=self.pos.device)
        caches, keys = _caches(self.model, self.run, batch, self.length)
        for group, old, new in zip(self.model.run_groups(self.run), self.caches, caches):
            rows = block_rows(sel, len(group), self.batch)
            for lo, ln in zip(old.layers, new.layers):
                k_rows, v_rows = lo.keys.index_select(0, rows), lo.values.index_select(0, rows)
                if not ln.is_initialized:
                    ln.lazy_initialization(k_rows, v_rows)
                ln.keys.copy_(k_rows)
                ln.values.copy_(v_rows)
                ln.cumulative_length.copy_(lo.cumulative_length)
        _release(self.model, self._keys)
        self.caches, self._keys, self.batch = caches, keys, batch
        self.mask, self.pos = self.mask.index_select(0, sel), self.pos.index_select(0, sel)
        if self.history is not None:
            self.history.select(sel)
        self.live = torch.tensor(live, device=self.pos.device)

    def _compiled(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One compiled step; None (and uncompiled from then on) when compilation fails on a new bucket."""
        state = _state(self.model)
        key = (self.run, self.heads, self.batch, self.length)
        first = key not in state["warm"]
        layers = [layer for c in self.caches for layer in c.layers]
        counters = [layer.cumulative_length.clone() for layer in layers] if first else None
        t0 = time.perf_counter()
        try:
            feats = None if self.history is None else self.history.features()
            out = self._fn(ids, self.mask, pos, self.caches, feats)
            if first and self.model.member_device(self.run[0]).type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, never crash a generation
            if not first:
                raise
            state["compile_failed"] = f"{type(e).__name__}: {e}"
            logger.warning(
                "torch.compile failed (%s): decoding with static caches, uncompiled", state["compile_failed"]
            )
            for layer, n in zip(layers, counters):
                layer.cumulative_length.copy_(n)  # undo a partial update of the caches' write counters
            self._fn = None
            return None
        if first:
            state["warm"].add(key)
            ids_ = tuple(self.model.model_ids[i] for i in self.run)
            w = Warmup(ids_, self.batch, self.length, time.perf_counter() - t0)
            state["report"].append(w)
            logger.info(
                "compiled the decode step of %s at batch %d, cache %d in %.1fs (once per shape bucket)",
                ", ".join(w.members), w.batch, w.cache_len, w.seconds,
            )  # fmt: skip
        logits, probs = out
        return logits, None if probs is None else probs.clone()

    def _trim(self, out: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Outputs for the caller's rows, in its order (a finished row gets the first live row's outputs)."""
        logits, probs = out
        self.logits = logits  # every slot's, for the history's next observe
        n = self.live.shape[0]
        if n == self.rows:
            index = None if self.batch == self.rows else slice(0, self.rows)
        else:
            index = torch.zeros(self.rows, dtype=torch.long, device=logits.device)
            index[self.live] = torch.arange(n, device=logits.device)
        if index is not None:
            logits = logits[index]
            probs = None if probs is None else probs[index]
        return logits, probs
