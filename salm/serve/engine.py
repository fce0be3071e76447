"""Continuous batching: one decode loop shared by every in-flight request.

Requests that arrive between two steps are prefilled together (left-padded, exactly as
:func:`salm.generation.generate` batches prompts) and join the running batch at the next step boundary:
each member's ``DynamicCache`` is left-padded to a common length and concatenated along the batch
dimension. A finished or cancelled request leaves at the next boundary (its cache rows are dropped, and
columns that became padding for every row are trimmed). Each row keeps its own attention mask and
position ids, so a request's greedy tokens are those it gets alone (as batched and single ``generate``
agree). Each row keeps its own sampling parameters, stop strings and random generator too: a seeded
request samples exactly as ``generate(prompt, seed=...)`` does.

The loop runs on one worker thread (torch releases the GIL); requests talk to it through a thread-safe
``sink`` callback, so the HTTP layer (or a plain script) never touches tensors.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from salm.decode_step import block_rows, ensemble_step, join_blocks
from salm.generation import (
    DecodeConfig,
    GenerationError,
    Routing,
    TokenDecision,
    _decision,
    _stop_index,
    choose_tokens,
    parse_routing,
)

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is full (the server answers 429)."""


class EngineStopped(RuntimeError):
    """The engine no longer accepts requests (shutting down)."""


@dataclass
class SamplingParams:
    """Per-request decoding settings (the OpenAI parameters plus saLM's routing)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    routing: str = "argmax"
    logprobs: int | None = None  # None: off; N >= 0: the chosen token's log-prob and the N most likely tokens

    def decode_config(self) -> DecodeConfig:
        """These settings as the library's :class:`DecodeConfig` (the one place decoding settings are checked)."""
        return DecodeConfig(
            max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            routing=self.routing, stop=self.stop, seed=self.seed,
        )  # fmt: skip


@dataclass
class TokenEvent:
    """One generated token: the text it makes visible (may be empty while a stop string could still
    match or a character is incomplete), who emitted it and, when asked, its log-probs."""

    text: str
    decision: TokenDecision | None  # None for the final flush of held-back text
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None


@dataclass
class FinishEvent:
    finish_reason: str  # "eos", "stop", "length", "context" (as GenerationOutput.stop_reason) or "cancelled"
    text: str  # the whole completion (stop string cut), equal to generate()'s text
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


class _Request:
    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, routing: Routing, sink, device):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.routing = routing
        self.sink: Callable[[Event], None] = sink
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.tokens: list[int] = []
        self.steps = 0
        self.sent = 0  # characters of text already handed out
        self.cancelled = False
        self.done = False


class RequestHandle:
    """What :meth:`Engine.submit` returns: cancel the request (it leaves at the next step boundary)."""

    def __init__(self, request: _Request, engine: Engine):
        self._request, self._engine = request, engine

    @property
    def id(self) -> int:
        return self._request.id

    def cancel(self) -> None:
        self._request.cancelled = True
        self._engine._wake()


class Engine:
    """The shared decode loop. ``submit`` queues a request; ``sink`` receives its events on the loop thread.

    ``max_batch`` requests decode together; up to ``max_queue`` more wait (beyond that ``submit`` raises
    :class:`QueueFullError`).
    """

    def __init__(
        self,
        model,
        max_batch: int = 16,
        max_queue: int = 64,
        dispatch: Callable[[list[tuple[Callable[[Event], None], Event]]], None] | None = None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        # One cache per forward: members on one base (LoRA adapters) run together, a block of rows each.
        self._groups = model.run_groups(range(len(model.members)))
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(model.eos_token_ids), 0)
        self._ids = itertools.count(1)
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._caches: list[Any] = []  # per forward (self._groups): a DynamicCache over the active rows
        self._mask: torch.Tensor | None = None  # [B, W] 1 where a cached position is real
        self._last: torch.Tensor | None = None  # [B] the token each row feeds next
        self._history: Any = None  # the rows' History (routers that read one), in row order
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for /health and tests)
        # Events go out once per step, all together: ``dispatch(pairs of (sink, event))`` lets an event loop
        # take a whole step's events in one wake-up (fewer thread switches fighting the decode loop for
        # the GIL); without it every sink is called on this thread.
        self._dispatch = dispatch
        self._outbox: list[tuple[_Request, Event]] = []

    # ------------------------------------------------------------------ public API
    def start(self, dispatch: Callable[[list[tuple[Callable[[Event], None], Event]]], None] | None = None) -> Engine:
        """Start the decode loop (``dispatch``: see ``__init__``)."""
        if dispatch is not None:
            self._dispatch = dispatch
        self._thread = threading.Thread(target=self._run, name="salm-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> RequestHandle:
        """Validate and queue one request; raise :class:`GenerationError` (bad input), :class:`QueueFullError`
        or :class:`EngineStopped`."""
        routing = self._validate(prompt_ids, params)
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            free = max(0, self.max_batch - len(self._active))  # waiting requests that join at the next step
            if len(self._waiting) >= free + self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({len(self._active)} running, {len(self._waiting)} waiting); retry later"
                )
            req = _Request(next(self._ids), list(prompt_ids), params, routing, sink, self.model.device)
            self._waiting.append(req)
            self._cond.notify_all()
        return RequestHandle(req, self)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._active), "waiting": len(self._waiting), "steps": self.steps}

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``grace`` seconds, cancel the rest, join."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            s = self.stats()
            if not s["running"] and not s["waiting"]:
                break
            time.sleep(0.02)
        with self._cond:
            for r in list(self._waiting) + self._active:
                r.cancelled = True
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ validation
    def _validate(self, prompt_ids: list[int], p: SamplingParams) -> Routing:
        if not prompt_ids:
            raise GenerationError("prompt is empty (no tokens)")
        p.decode_config().validate()
        ctx = self.model.context_length
        if ctx is not None and len(prompt_ids) >= ctx:
            raise GenerationError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {ctx} tokens "
                f"(prompt at most {ctx - 1} tokens, leaving room for one generated token)"
            )
        return parse_routing(p.routing, self.model.infos)

    # ------------------------------------------------------------------ the loop
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stop:
                    pending = list(self._waiting) + self._active
                    self._waiting.clear()
                    break
                joining = []
                while self._waiting and len(self._active) + len(joining) < self.max_batch:
                    joining.append(self._waiting.popleft())
            try:
                if joining:
                    self._admit(joining)
                if self._active:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug here fails the running requests, never the loop
                log.exception("engine step failed; failing %d running requests", len(self._active))
                for req in self._active + joining:
                    self._fail(req, e)
                self._active, self._caches, self._mask, self._last, self._history = [], [], None, None, None
            self._flush()
        for req in pending:
            self._finish(req, "cancelled")
        self._flush()
        self._active, self._caches, self._mask, self._last, self._history = [], [], None, None, None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, caches: list[Any], history: Any):
        """Every member over the fed tokens -> (logits [B, M, V] at the last position, routing probs [B, M]).

        All members run whatever each row's routing: rows of different routings share the batch. The step is
        generation's own (:func:`salm.decode_step.ensemble_step`), so the router sees exactly what it sees there
        (``history``: the rows' record on their text so far, for routers that read one, else None).
        """
        members = tuple(range(len(self.model.members)))
        logits, probs = ensemble_step(self.model, members, True, ids, mask, pos, caches, history)
        self.model.check_routing(probs)  # never answer on NaN routing: the running requests fail, naming the weights
        return logits, probs

    def _admit(self, joining: list[_Request]) -> None:
        """Prefill the requests that arrived since the last step together (left-padded, as ``generate``
        batches prompts), emit their first tokens, and merge the rows that go on into the running batch."""
        from transformers import DynamicCache

        reqs = []
        for req in joining:
            if req.cancelled:
                self._finish(req, "cancelled")
            else:
                reqs.append(req)
        if not reqs:
            return
        device = self.model.device
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(reqs):
            ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long, device=device)
            mask[row, width - len(r.prompt_ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [DynamicCache(config=self.model.members[g[0]].config) for g in self._groups]
        history = self.model.new_history(len(reqs))
        try:
            logits, probs = self._forward(ids, mask, pos, caches, history)
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving the others
            log.exception("prefill of %d requests failed", len(reqs))
            for req in reqs:
                self._fail(req, e)
            return
        keep, last = [], []
        for row, req in enumerate(reqs):
            token = self._advance(req, logits[row], probs[row], "during prefill")
            if token is not None:
                keep.append(row)
                last.append(token)
        if not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=device)
        if len(keep) < len(reqs):
            mask = mask[idx]
            self._select_rows(caches, idx, len(reqs))
        last = torch.tensor(last, dtype=torch.long, device=device)
        if history is not None:
            history.select(idx)
            history.observe(logits[idx], last)
        self._merge(caches, mask, last, history)
        self._active += [reqs[row] for row in keep]

    def _merge(self, caches: list[Any], mask: torch.Tensor, last: torch.Tensor, history: Any) -> None:
        """Join prefilled rows to the batch: left-pad both to one length, concatenate rows."""
        if not self._active:
            self._caches, self._mask, self._last, self._history = caches, mask, last, history
            self._trim()
            return
        if history is not None:
            self._history.extend(history)
        width = max(self._mask.shape[1], mask.shape[1])
        for group, old, new in zip(self._groups, self._caches, caches):
            for lo, ln in zip(_layers(old), _layers(new)):
                lo.keys = join_blocks(_pad_left(lo.keys, width), _pad_left(ln.keys, width), len(group))
                lo.values = join_blocks(_pad_left(lo.values, width), _pad_left(ln.values, width), len(group))
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)], 0)
        self._last = torch.cat([self._last, last])
        self._trim()

    def _step(self) -> None:
        """One decode step for every active row, then drop the rows that finished."""
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1
        try:
            logits, probs = self._forward(self._last[:, None], mask, pos, self._caches, self._history)
        except Exception as e:  # noqa: BLE001 - a failed batched forward fails its rows, not the server
            log.exception("decode step failed; failing the %d running requests", len(self._active))
            for req in self._active:
                self._fail(req, e)
            self._active, self._caches, self._mask, self._last, self._history = [], [], None, None, None
            return
        self.steps += 1
        self._mask = mask
        keep, last = [], []
        for r, req in enumerate(self._active):
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            token = self._advance(req, logits[r], probs[r], "while decoding")
            if token is not None:
                keep.append(r)
                last.append(token)
        if len(keep) < len(self._active):
            self._select(keep)
        if self._active:
            self._last = torch.tensor(last, dtype=torch.long, device=self._mask.device)
            if self._history is not None:  # the chosen tokens, under the logits they were chosen from
                self._history.observe(logits[torch.tensor(keep, device=logits.device)], self._last)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep``; trim leading columns that are padding in every remaining row."""
        self._active = [self._active[r] for r in keep]
        if not keep:
            self._caches, self._mask, self._history = [], None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._select_rows(self._caches, idx, self._mask.shape[0])
        self._mask = self._mask[idx]
        if self._history is not None:
            self._history.select(idx)
        self._trim()

    def _select_rows(self, caches: list[Any], idx: torch.Tensor, rows: int) -> None:
        """Keep rows ``idx`` of ``rows`` in every cache (members on one base hold a block of rows each)."""
        for group, cache in zip(self._groups, caches):
            index = block_rows(idx, len(group), rows)
            for layer in _layers(cache):
                layer.keys = layer.keys[index.to(layer.keys.device)]
                layer.values = layer.values[index.to(layer.values.device)]

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (they only cost attention time)."""
        start = int((self._mask.cumsum(-1) == 0).sum(-1).min())
        if start:
            self._mask = self._mask[:, start:]
            for cache in self._caches:
                for layer in _layers(cache):
                    layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    # ------------------------------------------------------------------ per request
    def _advance(self, req: _Request, logits: torch.Tensor, probs: torch.Tensor, when: str) -> int | None:
        """Choose and emit this row's next token: the token when the request goes on, None when it finished
        or failed (an exception fails this request only, never the batch)."""
        try:
            token, member = self._choose(req, logits, probs)
            finished = self._emit(req, token, member, logits, probs)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            log.exception("request %d failed %s", req.id, when)
            self._fail(req, e)
            return None
        return None if finished else token

    def _choose(self, req: _Request, logits: torch.Tensor, probs: torch.Tensor) -> tuple[int, int]:
        """This row's (next token, emitting member), exactly as single-prompt generate() chooses them
        (same inputs, same generator draws)."""
        p = req.params
        token, member = choose_tokens(
            logits[None], probs[None], req.routing, p.temperature, p.top_k, p.top_p, req.generator
        )
        return int(token[0]), int(member[0])

    def _emit(self, req: _Request, token: int, member: int, logits: torch.Tensor, probs: torch.Tensor) -> bool:
        """Record ``token`` and send its event; True when the request is finished (and sent its finish)."""
        model, p = self.model, req.params
        req.steps += 1
        if req.cancelled:
            self._finish(req, "cancelled")
            return True
        if token in model.eos_token_ids:
            self._finish(req, "eos")
            return True
        req.tokens.append(token)
        text = model.tokenizer.decode(req.tokens, skip_special_tokens=True)
        cut = _stop_index(text, p.stop) if p.stop else -1
        decision = _decision(model, token, member, probs.tolist())
        lp = top = None
        if p.logprobs is not None:
            lp, top = self._logprobs(req, token, member, logits, probs)
        if cut >= 0:
            self._send(req, TokenEvent(text[req.sent : cut], decision, lp, top))
            req.sent = cut
            self._finish(req, "stop", text[:cut])
            return True
        visible = _safe_prefix(text, p.stop)
        delta = text[req.sent : visible] if visible > req.sent else ""
        req.sent = max(req.sent, visible)
        self._send(req, TokenEvent(delta, decision, lp, top))
        ctx = model.context_length
        if req.steps >= p.max_tokens:
            self._finish(req, "length", text)
            return True
        if ctx is not None and len(req.prompt_ids) + req.steps >= ctx:
            self._finish(req, "context", text)
            return True
        return False

    def _logprobs(self, req: _Request, token: int, member: int, logits: torch.Tensor, probs: torch.Tensor):
        """Log-probs of the distribution the token came from, before temperature (OpenAI's convention):
        the emitting member's for argmax/threshold/member routing, the routed mixture for ``mixture``."""
        if req.routing.mode == "mixture":
            logp = torch.log((probs[:, None] * torch.softmax(logits, -1)).sum(0))
        else:
            logp = torch.log_softmax(logits[member], -1)
        top = {}
        n = req.params.logprobs or 0
        if n:
            vals, ids = logp.topk(n)
            top = {self.model.tokenizer.decode([int(i)]): float(v) for v, i in zip(vals, ids)}
        return float(logp[token]), top

    def _finish(self, req: _Request, reason: str, text: str | None = None) -> None:
        if req.done:
            return
        req.done = True
        if text is None:
            text = self.model.tokenizer.decode(req.tokens, skip_special_tokens=True)
            if req.params.stop:
                cut = _stop_index(text, req.params.stop)
                text = text[:cut] if cut >= 0 else text
        if reason != "cancelled" and len(text) > req.sent:  # flush what was held back
            self._send(req, TokenEvent(text[req.sent :], None))
            req.sent = len(text)
        self._send(req, FinishEvent(reason, text, len(req.prompt_ids), len(req.tokens)))

    def _send(self, req: _Request, event: Event) -> None:
        self._outbox.append((req, event))

    def _flush(self) -> None:
        """Hand out this step's events; a sink that fails (its client is gone) cancels its request."""
        out, self._outbox = self._outbox, []
        if not out:
            return
        if self._dispatch is not None:
            try:
                self._dispatch([(req.sink, ev) for req, ev in out])
            except Exception:  # noqa: BLE001 - e.g. the event loop is closed: nobody is listening any more
                log.warning("event dispatch failed; cancelling %d requests", len(out), exc_info=True)
                for req, _ in out:
                    req.cancelled = True
            return
        for req, ev in out:
            try:
                req.sink(ev)
            except Exception:  # noqa: BLE001 - the consumer's problem must not stop the loop
                log.warning("request %d: its event sink failed; cancelling it", req.id, exc_info=True)
                req.cancelled = True

    def _fail(self, req: _Request, error: BaseException) -> None:
        if not req.done:
            req.done = True
            self._send(req, ErrorEvent(f"{type(error).__name__}: {error}"))


def _layers(cache: Any) -> list[Any]:
    """The cache's per-layer key/value holders; only plain (full-attention) dynamic layers can be merged."""
    from transformers.cache_utils import DynamicLayer

    layers = cache.layers
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"continuous batching needs full-attention DynamicLayer caches, got {type(layer).__name__}"
            )
    return layers


def _pad_left(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """Zero-pad ``t`` on the left along ``dim`` to ``width`` (keys/values [B, H, L, D] or masks [B, L])."""
    n = width - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _safe_prefix(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be shown now: not a trailing incomplete character (U+FFFD from a partial
    UTF-8 sequence), and not a tail that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                end -= k
                break
    return end
