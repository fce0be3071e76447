"""Routed decoding: one KV cache per member, batched with left padding, a routing decision per token.

At every step each member reads only the newly emitted token (its own cache holds the rest), the
heads score the members' final hidden states, and a routing rule picks whose distribution the next
token comes from. ``routing="member:<id>"`` runs the very same loop with only that member (the heads
need every member, so they are skipped), which is what makes member-vs-ensemble comparisons fair and
costs one member forward per token. The member forwards live in :func:`ensemble_step`, shared by the
dynamic path (growing caches) and the static one (:mod:`salm.fast_decode`, fixed shapes, compilable).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from salm.decode_step import DynamicStepper
from salm.fast_decode import StaticStepper
from salm.heads import heads_in_eval_mode
from salm.members import ModelInfo, resolve_member_id

ROUTING_MODES = ("argmax", "mixture", "threshold:<p>", "member:<id>")
SEED_LIMIT = 2**63
"""Seeds are ``0 <= seed < 2**63`` everywhere in saLM (decoding, evaluation, training, the server): torch's
generators take 64-bit seeds, and one range stated once is easier to use than torch's signed-or-unsigned one."""


class _FromConfig:
    """The default of every decoding argument of :func:`generate` and :func:`stream`: take the value from
    the ``config`` (a :class:`DecodeConfig`). A sentinel rather than None, because None is a value some
    settings take (``seed=None``, ``stop=None``) and a bad one for others (``routing=None`` is an error)."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG: Any = _FromConfig()


class GenerationError(ValueError):
    """Bad generation arguments (the message names the argument)."""


@dataclass
class TokenDecision:
    """One generated token: who emitted it and how the router weighed the members."""

    token: str
    token_id: int
    member: str
    routing_probs: dict[str, float]

    def to_seed_dict(self) -> dict[str, Any]:
        """The seed's ``answer_confidence.json`` token layout."""
        return {
            "token": self.token,
            "token_id": self.token_id,
            "best_model": self.member,
            "confidence_scores": self.routing_probs,
        }


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    decisions: list[TokenDecision] = field(default_factory=list)
    stop_reason: str = "length"  # "eos", "stop", "length" or "context"

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "stop_reason": self.stop_reason,
            "decisions": [asdict(d) for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationOutput:
        """Inverse of :meth:`to_dict` (evaluation stores finished generations to resume from)."""
        return cls(d["text"], list(d["token_ids"]), [TokenDecision(**x) for x in d["decisions"]], d["stop_reason"])


@dataclass(frozen=True)
class Routing:
    mode: str  # "argmax" | "mixture" | "threshold" | "member"
    threshold: float = 0.0
    member: int = 0


def parse_routing(routing: str, members: Sequence[ModelInfo | str]) -> Routing:
    """Parse ``argmax`` | ``mixture`` | ``threshold:<p>`` | ``member:<id>``.

    ``members`` are the loaded members' infos (``model.infos``): ``member:<alias>`` resolves through their
    aliases (:func:`salm.members.resolve_member_id`); plain id strings are members without aliases.
    """
    if routing in ("argmax", "mixture"):
        return Routing(routing)
    kind, _, arg = routing.partition(":")
    if kind == "threshold":
        try:
            p = float(arg)
        except ValueError:
            p = -1.0
        if not 0.0 < p < 1.0:
            raise GenerationError(f"routing {routing!r}: threshold must be a number in (0, 1), e.g. threshold:0.6")
        return Routing("threshold", threshold=p)
    if kind == "member":
        ids = [m if isinstance(m, str) else m.id for m in members]
        mid = resolve_member_id(arg, members)
        if mid is None:
            raise GenerationError(f"routing {routing!r}: unknown member {arg!r}; members are {ids}")
        return Routing("member", member=ids.index(mid))
    raise GenerationError(f"unknown routing {routing!r}; use one of {', '.join(ROUTING_MODES)}")


def _filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering of [B, V] probabilities, renormalised."""
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > top_p * cum[..., -1:]  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return probs / probs.sum(-1, keepdim=True)


def choose_tokens(
    logits: torch.Tensor,
    routing_probs: torch.Tensor,
    routing: Routing,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, M, V], routing probs [B, M] -> (next token [B], emitting member [B]).

    argmax/threshold/member pick one member per row and sample from its own (tempered) distribution.
    mixture samples from sum_m pi_m p_m -- the distribution the training loss optimises -- and credits
    the token to the member with the largest share pi_m p_m(token).
    """
    B, M, _ = logits.shape
    rows = torch.arange(B, device=logits.device)
    if routing.mode == "mixture":
        t = temperature if temperature > 0 else 1.0
        member_probs = torch.softmax(logits / t, dim=-1)  # [B, M, V]
        mix = (routing_probs.unsqueeze(-1) * member_probs).sum(1)
        if temperature == 0:
            token = mix.argmax(-1)
        else:
            token = torch.multinomial(_filter_probs(mix, top_k, top_p), 1, generator=generator).squeeze(-1)
        share = routing_probs * member_probs[rows, :, token]
        return token, share.argmax(-1)
    if routing.mode == "member":
        member = torch.full((B,), routing.member, dtype=torch.long, device=logits.device)
    elif routing.mode == "threshold":
        others = routing_probs.clone()
        others[:, 0] = -1.0
        best = others.argmax(-1)
        over = others[rows, best] > routing.threshold
        member = torch.where(over, best, torch.zeros_like(best))
    else:
        member = routing_probs.argmax(-1)
    chosen = logits[rows, member]  # [B, V]
    if temperature == 0:
        return chosen.argmax(-1), member
    probs = _filter_probs(torch.softmax(chosen / temperature, dim=-1), top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), member


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class DecodeConfig:
    """How to decode: every setting that decides the tokens, with its default in this one place.

    ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` are off. ``routing`` is ``argmax``,
    ``mixture``, ``threshold:<p>`` or ``member:<id>`` (:func:`parse_routing`). ``stop`` strings end a row
    and are cut from its text. ``seed`` fixes sampling (None: torch's global RNG). ``truncate="left"``
    keeps a too-long prompt's end instead of raising. ``cache_implementation="static"`` decodes over
    preallocated static caches, and ``compile=True`` (implies static) also compiles the decode step with
    ``torch.compile`` (:mod:`salm.fast_decode`); both give the default path's tokens. The commands,
    evaluation, the quickstart, the server and the harness adapter all build one of these;
    :meth:`validate` is the one place the settings are checked, and needs no model, so the commands call
    it before loading members.
    """

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    routing: str = "argmax"
    stop: str | Sequence[str] | None = None
    seed: int | None = None
    truncate: str | None = None
    cache_implementation: str = "dynamic"
    compile: bool = False

    def validate(self) -> DecodeConfig:
        """Raise :class:`GenerationError` naming the first bad setting (type, range, NaN); returns self.

        A ``member:<id>`` routing's id is checked against the members later, by :func:`parse_routing`.
        """
        max_new_tokens, temperature, top_p, top_k = self.max_new_tokens, self.temperature, self.top_p, self.top_k
        routing, stop, seed = self.routing, self.stop, self.seed
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not _is_real(temperature):
            raise GenerationError(f"temperature must be a number, got {type(temperature).__name__} {temperature!r}")
        if not math.isfinite(temperature):
            raise GenerationError(f"temperature must be finite (0 = greedy), got {temperature}")
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not _is_real(top_p):
            raise GenerationError(f"top_p must be a number, got {type(top_p).__name__} {top_p!r}")
        if not 0.0 < top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
        if not _is_int(top_k) or top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        if not isinstance(routing, str):
            raise GenerationError(
                f"routing must be a string ({', '.join(ROUTING_MODES)}), got {type(routing).__name__}"
            )
        if not routing.startswith("member:"):
            parse_routing(routing, [])
        if stop is not None and not isinstance(stop, str):
            if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
                raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}")
        if seed is not None and not _is_int(seed):
            raise GenerationError(f"seed must be an integer or None, got {seed!r}")
        if seed is not None and not 0 <= seed < SEED_LIMIT:
            raise GenerationError(f"seed must be >= 0 and < 2**63, got {seed}")
        if self.cache_implementation not in ("dynamic", "static"):
            raise GenerationError(
                f"cache_implementation must be 'dynamic' or 'static', got {self.cache_implementation!r}"
            )
        if self.truncate not in (None, "left"):
            raise GenerationError(f"truncate must be None or 'left', got {self.truncate!r}")
        return self

    @property
    def stops(self) -> list[str]:
        """``stop`` as a list (a single string is one stop string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def merged(self, **overrides: Any) -> DecodeConfig:
        """A copy with every override that is not :data:`FROM_CONFIG` applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not FROM_CONFIG})


def check_batch_size(batch_size: Any) -> None:
    """Raise :class:`GenerationError` unless ``batch_size`` is None or an integer >= 1 (not a decoding setting)."""
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise GenerationError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")


def _prompt_list(prompt: Any) -> list[str]:
    """A string or an iterable of strings, as a list; anything else (bytes, numbers, None) is an error."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
        raise GenerationError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    prompt = list(prompt)
    if not prompt:
        raise GenerationError("prompt list is empty: pass at least one prompt")
    for i, p in enumerate(prompt):
        if not isinstance(p, str):
            raise GenerationError(f"prompt {i} is {type(p).__name__}, not a string")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # the tokenizer would fail with a raw TypeError
            bad = p[e.start]
            raise GenerationError(f"prompt {i} holds an unpaired surrogate {bad!r} at position {e.start}") from None
    return prompt


def prompt_budget(context_length: int, room: int) -> int:
    """Prompt tokens kept by ``truncate="left"``: the context minus ``room`` for generation, but never less
    than half the context (a prompt cut to a few tokens is useless; generation then stops at the context)."""
    return max(context_length - room, context_length // 2, 1)


def encode_prompts(model, prompts: list[str], truncate: str | None = None, room: int = 1) -> list[list[int]]:
    """Token ids per prompt; a prompt beyond the smallest member context is an error unless truncate='left',
    which keeps the prompt's last :func:`prompt_budget` tokens, leaving ``room`` for generation."""
    if truncate not in (None, "left"):
        raise GenerationError(f"truncate must be None or 'left', got {truncate!r}")
    ctx = model.context_length
    encoded = []
    for i, p in enumerate(prompts):
        ids = model.tokenizer(p)["input_ids"]
        if not ids:
            raise GenerationError(f"prompt {i} is empty (no tokens)")
        if ctx is not None and len(ids) >= ctx:
            if truncate != "left":
                smallest = min(
                    (m for m in model.members if getattr(m.config, "max_position_embeddings", None)),
                    key=lambda m: m.config.max_position_embeddings,
                )
                who = model.model_ids[model.members.index(smallest)]
                raise GenerationError(
                    f"prompt {i} has {len(ids)} tokens; member {who!r} reads at most {ctx} "
                    "(pass truncate='left' to keep the prompt's end)"
                )
        if truncate == "left" and ctx is not None:
            ids = ids[-prompt_budget(ctx, room) :]
        encoded.append(ids)
    return encoded


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, x in enumerate(batch):
        ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x) :] = 1
    return ids, mask


def members_to_run(routing: Routing, n_members: int) -> tuple[int, ...]:
    """The members a routing needs at every step: the forced one for ``member:<id>``, else all of them."""
    return (routing.member,) if routing.mode == "member" else tuple(range(n_members))


def decode_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    routing: Routing,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    cache_implementation: str = "dynamic",
    compile: bool = False,
    finished: Sequence[bool] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], members [B], routing probs [B, M]) per step; the caller decides when to stop.

    Only the members the routing needs run (:func:`members_to_run`): ``member:<id>`` runs that member
    alone, and since the heads need every member's hidden state, its routing probs are then one-hot on the
    forced member (the routing actually used) rather than the heads' opinion. At most
    ``min(max_new_tokens, context - prompt width)`` steps are yielded (a sequence never exceeds the context).
    ``cache_implementation="static"`` (implied by ``compile``) decodes over preallocated static caches in
    fixed shapes (:mod:`salm.fast_decode`); ``use_cache=False`` recomputes everything at every step.
    ``finished`` is the caller's live per-row record of rows it no longer needs (updated between steps):
    the static path moves the other rows into a smaller batch bucket when they fit one; a finished row's
    later outputs are meaningless.
    """
    M = len(model.members)
    ids, mask = input_ids.to(model.device), attention_mask.to(model.device)
    ctx = model.context_length
    steps = min(max_new_tokens, ctx - ids.shape[1]) if ctx is not None else max_new_tokens
    run = members_to_run(routing, M)
    heads = routing.mode != "member"
    if use_cache and (compile or cache_implementation == "static"):
        stepper: Any = StaticStepper(model, run, heads, mask, steps, compile)
    elif cache_implementation in ("dynamic", "static"):
        stepper = DynamicStepper(model, run, heads, mask, use_cache)
    else:
        raise GenerationError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
    local = Routing("member", member=0) if routing.mode == "member" else routing
    members_run = torch.tensor(run, dtype=torch.long, device=model.device)
    try:
        logits, probs = stepper.prefill(ids)
        for step in range(steps):
            if probs is not None:  # never choose a token on NaN routing (finite weights can still overflow)
                model.check_routing(probs, f" at generated token {step + 1}")
            if probs is None:  # member routing: the forced member carries all the weight
                probs = torch.zeros(ids.shape[0], M, device=model.device)
                probs[:, routing.member] = 1.0
            token, member = choose_tokens(logits, probs[:, list(run)], local, temperature, top_k, top_p, generator)
            yield token, members_run[member], probs
            if step + 1 == steps:
                return
            logits, probs = stepper.step(token, finished)
    finally:
        if hasattr(stepper, "close"):
            stepper.close()


def _stop_index(text: str, stop: Sequence[str]) -> int:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else -1


def generate(
    model,
    prompt: str | Sequence[str] | None = None,
    max_new_tokens: int = FROM_CONFIG,
    temperature: float = FROM_CONFIG,
    top_p: float = FROM_CONFIG,
    top_k: int = FROM_CONFIG,
    routing: str = FROM_CONFIG,
    return_decisions: bool = False,
    stop: str | Sequence[str] | None = FROM_CONFIG,
    seed: int | None = FROM_CONFIG,
    use_cache: bool = True,
    truncate: str | None = FROM_CONFIG,
    batch_size: int | None = None,
    streamer: Callable[[int, TokenDecision], None] | None = None,
    return_outputs: bool = False,
    progress: bool = False,
    cache_implementation: str = FROM_CONFIG,
    compile: bool = FROM_CONFIG,
    *,
    config: DecodeConfig | None = None,
):
    """Generate with per-token routing.

    The decoding settings come from ``config`` (default: :class:`DecodeConfig`'s defaults); each of
    ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``routing``, ``stop``, ``seed``, ``truncate``,
    ``cache_implementation`` and ``compile`` that is given overrides the config's value (the default,
    :data:`FROM_CONFIG`, keeps it); the meaning of each is documented on :class:`DecodeConfig`.

    A string prompt returns a string, a list returns a list (in order). With ``return_decisions`` each
    result is a dict ``{"text", "token_ids", "stop_reason", "decisions"}`` where decisions list, per
    generated token, its text, id, the member that emitted it and every member's routing probability.
    ``return_outputs`` returns :class:`GenerationOutput` objects instead. Generation stops at any
    member's EOS id, at a ``stop`` string (cut from the text) or after ``max_new_tokens``.
    ``streamer(row, decision)`` is called for every token as it is made. ``batch_size`` prompts are
    decoded together (default: all); ``use_cache=False`` recomputes every step (the reference path).
    Without a working ``torch.compile``, ``compile=True`` warns once and decodes uncompiled.
    """
    single = isinstance(prompt, str)
    prompts = _prompt_list(prompt)
    cfg = (config or DecodeConfig()).merged(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, routing=routing,
        stop=stop, seed=seed, truncate=truncate, cache_implementation=cache_implementation, compile=compile,
    ).validate()  # fmt: skip
    check_batch_size(batch_size)
    rt = parse_routing(cfg.routing, model.infos)
    encoded = encode_prompts(model, prompts, cfg.truncate, room=cfg.max_new_tokens)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    # Sorting by length keeps padding small inside each batch; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    bs = batch_size or len(prompts)
    results: list[GenerationOutput | None] = [None] * len(prompts)
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generating", unit="prompt")
    # Route with eval-mode heads without model.eval()/train(): those flags are shared with other threads.
    with heads_in_eval_mode():
        try:
            for rows in batches:
                outs = _generate_batch(model, [encoded[i] for i in rows], cfg, rt, generator, use_cache, streamer, rows)
                for i, o in zip(rows, outs):
                    results[i] = o
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
    if return_outputs:
        final: list[Any] = results
    elif return_decisions:
        final = [r.to_dict() for r in results]
    else:
        final = [r.text for r in results]
    return final[0] if single else final


def _generate_batch(
    model,
    encoded: list[list[int]],
    cfg: DecodeConfig,
    rt: Routing,
    generator: torch.Generator | None,
    use_cache: bool,
    streamer: Callable[[int, TokenDecision], None] | None,
    rows: list[int],
) -> list[GenerationOutput]:
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(model.eos_token_ids), 0)
    ids, mask = _left_pad(encoded, pad_id)
    B = len(encoded)
    stops = cfg.stops
    gen: list[list[int]] = [[] for _ in range(B)]
    members: list[list[int]] = [[] for _ in range(B)]
    probs_hist: list[list[list[float]]] = [[] for _ in range(B)]
    reason = ["length"] * B
    done = [False] * B
    steps = decode_steps(
        model, ids, mask, cfg.max_new_tokens, rt, cfg.temperature, cfg.top_k, cfg.top_p, generator, use_cache,
        cfg.cache_implementation, cfg.compile, done,
    )  # fmt: skip
    n_steps = 0
    for token, member, probs in steps:
        n_steps += 1
        token_l, member_l, probs_l = token.tolist(), member.tolist(), probs.tolist()
        for r in range(B):
            if done[r]:
                continue
            t = token_l[r]
            if t in model.eos_token_ids:
                done[r], reason[r] = True, "eos"
                continue
            gen[r].append(t)
            members[r].append(member_l[r])
            probs_hist[r].append(probs_l[r])
            if streamer is not None:
                streamer(rows[r], _decision(model, t, member_l[r], probs_l[r]))
            if stops and _stop_index(tok.decode(gen[r], skip_special_tokens=True), stops) >= 0:
                done[r], reason[r] = True, "stop"
        if all(done):
            steps.close()
            break
    if n_steps < cfg.max_new_tokens:
        for r in range(B):
            if not done[r]:
                reason[r] = "context"
    outs = []
    for r in range(B):
        text = tok.decode(gen[r], skip_special_tokens=True)
        cut = _stop_index(text, stops) if stops else -1
        if cut >= 0:
            text = text[:cut]
        decisions = [_decision(model, t, m, p) for t, m, p in zip(gen[r], members[r], probs_hist[r])]
        outs.append(GenerationOutput(text, gen[r], decisions, reason[r]))
    return outs


def _decision(model, token_id: int, member: int, probs: list[float]) -> TokenDecision:
    return TokenDecision(
        token=model.tokenizer.decode([token_id]),
        token_id=token_id,
        member=model.model_ids[member],
        routing_probs={mid: float(p) for mid, p in zip(model.model_ids, probs)},
    )
