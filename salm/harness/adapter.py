"""lm-evaluation-harness model ``salm``: the routed ensemble (or one member through the same code) as an ``LM``.

Every member runs through this very class with ``routing="member:<id>"``, so a member and the ensemble
share tokenization, batching, truncation and stopping; only the routing rule differs. A member runs as an
ensemble of itself alone (same class and code, its loaded weights shared), so it costs one member, not all.

What each routing means for a log-likelihood (per continuation token t, summed over the continuation):

* ``mixture``: ``log sum_m pi_m(t) p_m(token_t)``, the distribution the heads were trained on (the
  training loss is its negative log-likelihood) and the one ``routing=mixture`` samples from;
* ``argmax``: ``log p_k(token_t)`` with ``k = argmax_m pi_m(t)``, the member hard routing would let emit;
* ``threshold:<p>``: ``log p_k(token_t)`` with k the first member unless another member's routing
  probability exceeds p (the rule of :func:`salm.generation.choose_tokens`);
* ``member:<id>``: that member's own ``log p(token_t)``, i.e. exactly what lm-eval's ``hf`` model computes.

``is_greedy`` says whether every continuation token is the argmax of that same routed distribution.
All continuations of a batch are scored in one teacher-forced pass of every member
(:meth:`MultiModelWithScalarHeads.forward` with labels; only continuation rows reach the LM heads).

Use: ``lm_eval.simple_evaluate(model=SalmLM(models="members.yaml", weights="best_model"), tasks=[...])``, or
``python -m salm.harness --model salm --model_args models=members.yaml,weights=best_model ...`` (lm-eval's own
command line with this model registered; lm-eval 0.4 has no plugin discovery, so plain ``lm_eval --model salm``
only works after ``import salm.harness.adapter``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from salm.generation import DecodeConfig, Routing, choose_tokens, parse_routing

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when no member states a context length
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default
# Continuation rows projected through the LM heads at once for the greedy check (bounds a [rows, V] buffer).
_GREEDY_ELEMENTS = 1 << 26


def routed_token_logprobs(gold: torch.Tensor, router_logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Per-position log-prob of the gold token under ``routing``: gold ``[..., M]`` log p_m, router ``[..., M]``.

    The member choice for argmax/threshold/member is :func:`salm.generation.choose_tokens`'s own rule, so
    scoring and generation route identically by construction.
    """
    if routing.mode == "mixture":
        return torch.logsumexp(F.log_softmax(router_logits.float(), dim=-1) + gold.float(), dim=-1)
    member = chosen_members(router_logits, routing)
    return gold.float().gather(-1, member.unsqueeze(-1)).squeeze(-1)


def chosen_members(router_logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The member index argmax/threshold/member routing picks at each position (shape of router_logits[..., 0])."""
    shape, M = router_logits.shape[:-1], router_logits.shape[-1]
    probs = torch.softmax(router_logits.float().reshape(-1, M), dim=-1)
    dummy = torch.zeros(probs.shape[0], M, 1, device=probs.device)  # one-token vocabulary: only the choice matters
    _, member = choose_tokens(dummy, probs, routing, temperature=0.0)
    return member.reshape(shape)


@register_model("salm")
class SalmLM(TemplateLM):
    """A :class:`~salm.ensemble.MultiModelWithScalarHeads` as an lm-eval ``LM`` (see the module docstring).

    Args (all also accepted as ``--model_args key=value``): ``models`` member-set file (default: the
    Qwen2.5-1.5B trio, or the members named in the heads' config), ``weights`` trained heads, ``routing``
    (``argmax``, ``mixture``, ``threshold:<p>``, ``member:<id>``), ``dtype``, ``device``, ``batch_size``,
    ``max_length`` (default: the smallest member context), ``max_gen_toks`` (default 256, as ``hf``),
    ``logits_cache`` (default on, as ``hf``: one-token continuations of one context share a pass),
    ``seed`` for sampled generation, ``trust_remote_code``. ``ensemble=`` adopts an already loaded ensemble
    (``salm harness`` loads the members once and evaluates every routing on them).

    Under ``accelerate launch`` / ``torchrun`` with several processes each process loads the ensemble on its
    own device (CPU processes use gloo) and lm-eval hands each its share of the documents.
    """

    backend = "causal"

    def __init__(
        self,
        models: str | None = None,
        weights: str | None = None,
        routing: str = "argmax",
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        logits_cache: bool = True,
        seed: int = 1234,
        trust_remote_code: bool = False,
        ensemble: Any = None,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; batch sizes here are fixed
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            logger.warning("salm: ignoring unknown model arguments %s", sorted(kwargs))
        if str(batch_size).startswith("auto"):
            raise ValueError("salm: batch_size=auto is not supported; pass an integer batch size")
        self._batch_size = 8 if batch_size is None else int(batch_size)  # 0 is an error, not the default
        if self._batch_size < 1:
            raise ValueError(f"salm: batch_size must be >= 1, got {batch_size}")
        self._max_gen_toks = int(max_gen_toks)
        if self._max_gen_toks < 1:
            raise ValueError(f"salm: max_gen_toks must be >= 1, got {max_gen_toks}")
        self.logits_cache = _bool(logits_cache)
        self.seed = int(seed)
        self._setup_distributed(device)
        if ensemble is None:
            warn = not routing.startswith("member:")
            ensemble = _load_ensemble(models, weights, dtype, self._device_arg, _bool(trust_remote_code), warn)
        self.ensemble = ensemble.eval()
        self.tokenizer = ensemble.tokenizer
        self.routing_name = routing
        self.routing = parse_routing(routing, ensemble.infos)
        # member:<id> runs an ensemble of that one member (the same class and code, sharing the loaded weights):
        # the other members' outputs could not change its scores, only cost their forward passes.
        if self.routing.mode == "member":
            self.model = single_member_view(ensemble, self.routing.member)
            self.routing = parse_routing(routing, self.model.infos)
        else:
            self.model = self.ensemble
        self.weights = weights
        self._max_length = int(max_length) if max_length else None
        self._device = ensemble.device

    # ------------------------------------------------------------------ processes
    def _setup_distributed(self, device: str | None) -> None:
        """Rank and world from ``accelerate`` when several processes run; the ensemble then sits on this
        rank's device. A single process never imports accelerate."""
        self._device_arg = device
        self._state = process_state(device)
        if self._state is not None:
            self._rank = self._state.process_index
            self._world_size = self._state.num_processes
            self._device_arg = str(self._state.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else EOS (as lm-eval's ``hf``)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.ensemble.context_length or DEFAULT_MAX_LENGTH

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "salm")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's own default special tokens unless told (as ``hf``); no second BOS before a BOS."""
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's ``--apply_chat_template``: the shared tokenizer's chat template (instruct members)."""
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        """Written into lm-eval's results ``config``: which members, heads and routing produced the numbers."""
        return {
            "salm_members": [dict(i.to_dict()) for i in self.ensemble.infos],
            "salm_routing": self.routing_name,
            "salm_weights": self.weights,
            "model_dtype": str(self.ensemble.dtype),
        }

    # ------------------------------------------------------------------ log-likelihood
    def _score_batch(
        self, seqs: list[tuple[list[int], int]], greedy: bool, want_dist: list[bool] | None = None
    ) -> list[tuple[float, bool, tuple[torch.Tensor, bool] | None]]:
        """Right-padded batch of (tokens, continuation length) -> (routed log-prob sum, is_greedy, and where
        ``want_dist`` asks: (the routed log-distribution [V] at the row's last position, whether every earlier
        continuation token was the routed argmax))."""
        want = want_dist or [False] * len(seqs)
        width = max(len(s) for s, _ in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (seq, n_cont) in enumerate(seqs):
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            # The last token is only a label: masked out, so no member reads past max_length positions
            # (its position id repeats the previous one and causal attention keeps it out of every earlier output).
            mask[r, : len(seq) - 1] = 1
            labels[r, len(seq) - n_cont : len(seq)] = ids[r, len(seq) - n_cont : len(seq)]
        full = greedy or any(want)
        with torch.no_grad():
            out = self.model(ids, attention_mask=mask, labels=labels, return_hidden_states=full)
            token_lp = routed_token_logprobs(out.gold_logprobs, out.router_logits, self.routing)
            sums = (token_lp * out.loss_mask.float()).sum(-1)
            dists: list[tuple[torch.Tensor, bool] | None] = [None] * len(seqs)
            is_greedy = self._routed_distributions(out, labels, want, dists) if full else None
        if is_greedy is None or not greedy:
            is_greedy = torch.zeros(len(seqs), dtype=torch.bool)
        return [(float(s), bool(g), d) for s, g, d in zip(sums.tolist(), is_greedy.tolist(), dists)]

    def _routed_distributions(
        self, out: Any, labels: torch.Tensor, want: list[bool], dists: list[tuple[torch.Tensor, bool] | None]
    ) -> torch.Tensor:
        """[B] whether each continuation is the routed distribution's argmax at every position; where ``want[r]``,
        ``dists[r]`` = (row r's routed log-distribution at its last continuation position, whether its earlier
        continuation tokens were all the argmax).

        Logits come from each member's LM head applied to the final hidden states the same pass returned, only at
        the continuation positions, in row chunks.
        """
        model, mask = self.model, out.loss_mask
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        targets = targets.to(model.device)[mask]
        rows_idx = mask.nonzero()[:, 0]
        log_pi = F.log_softmax(out.router_logits[mask].float(), dim=-1)  # [N, M]
        member = None if self.routing.mode == "mixture" else chosen_members(out.router_logits[mask], self.routing)
        N = targets.shape[0]
        hits = torch.zeros(N, dtype=torch.bool, device=model.device)
        rows_list = rows_idx.tolist()
        last = {r: p for p, r in enumerate(rows_list)}  # row -> its last continuation position
        last_dist: dict[int, torch.Tensor] = {}
        step = max(1, _GREEDY_ELEMENTS // (model.vocab_size * len(model.members)))
        with torch.no_grad():
            for s in range(0, N, step):
                logps = []
                for i, m in enumerate(model.members):
                    h = out.hidden_states[i][mask][s : s + step].to(model.member_device(i))
                    lg = m.get_output_embeddings()(h)[..., : model.vocab_size].float().to(model.device)
                    logps.append(F.log_softmax(lg, dim=-1))
                stacked = torch.stack(logps, dim=1)  # [n, M, V]
                if member is None:
                    routed = torch.logsumexp(log_pi[s : s + step, :, None] + stacked, dim=1)
                else:
                    routed = stacked[torch.arange(stacked.shape[0]), member[s : s + step]]
                hits[s : s + step] = routed.argmax(-1) == targets[s : s + step]
                for j, r in enumerate(rows_list[s : s + step]):
                    if want[r] and last[r] == s + j:
                        last_dist[r] = routed[j].cpu()
        hits_list = hits.tolist()
        for r, dist in last_dist.items():
            dists[r] = (dist, all(h for p, (h, rr) in enumerate(zip(hits_list, rows_list)) if rr == r and p != last[r]))
        greedy = torch.ones(mask.shape[0], dtype=torch.long, device=model.device)
        greedy.scatter_reduce_(0, rows_idx.to(model.device), hits.long(), reduce="amin")
        return greedy.bool().cpu()

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
        greedy: bool = True,
    ) -> list[tuple[float, bool]]:
        """Batched, longest first; as ``hf``, a sequence beyond ``max_length + 1`` tokens (``max_length`` read, the
        last one only predicted) loses the start of its context.

        With ``logits_cache`` (on, as in ``hf``), continuations that differ only in their last token after the
        same tokens (multiple-choice letters, yes/no) share one pass: the routed distribution at that last position
        scores every candidate.
        """
        seqs: list[tuple[list[int], int]] = []
        for _, ctx, cont in requests:
            if not cont or len(cont) > self.max_length:
                raise ValueError(f"salm: a continuation must have 1 to {self.max_length} tokens, got {len(cont)}")
            window = (ctx + cont)[-(self.max_length + 1) :]
            seqs.append((window, min(len(cont), len(window) - 1)))
        shared: dict[int, list[int]] = {}  # representative -> every request scored from its distribution
        if self.logits_cache:
            groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
            for i, (window, n_cont) in enumerate(seqs):
                groups.setdefault((tuple(window[:-1]), n_cont), []).append(i)
            shared = {idx[0]: idx for idx in groups.values() if len(idx) > 1}
        followers = {j for idx in shared.values() for j in idx[1:]}
        run = [i for i in range(len(seqs)) if i not in followers]
        order = sorted(run, key=lambda i: (-len(seqs[i][0]), seqs[i][0]))
        bs = override_bs or self.batch_size
        results: list[tuple[float, bool] | None] = [None] * len(seqs)
        bar = tqdm(total=len(seqs), disable=disable_tqdm or self.rank != 0, desc="salm loglikelihood")
        for start in range(0, len(order), bs):
            rows = order[start : start + bs]
            scored = self._score_batch([seqs[i] for i in rows], greedy, [i in shared for i in rows])
            for i, (total, is_greedy, cached) in zip(rows, scored):
                if cached is None:
                    results[i] = (total, is_greedy)
                    continue
                dist, prefix_greedy = cached
                best, earlier = int(dist.argmax()), total - float(dist[seqs[i][0][-1]])
                for j in shared[i]:
                    token = seqs[j][0][-1]
                    results[j] = (earlier + float(dist[token]), greedy and prefix_greedy and token == best)
            for i in rows:
                for j in shared.get(i, [i]):
                    req = requests[j][0]
                    if req is not None:
                        self.cache_hook.add_partial("loglikelihood", req, results[j])
            bar.update(sum(len(shared.get(i, [i])) for i in rows))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring: disjoint windows of ``max_length`` (lm-eval's rolling windows), all batched."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for r, (string,) in enumerate(req.args for req in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, token_windows):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, greedy=False)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """saLM's batched KV-cached routed generation, grouped by generation kwargs.

        ``until`` (plus the EOS text, as ``hf``) stops a row and is cut from its text; any member's EOS id also
        stops it; ``max_gen_toks`` caps new tokens; prompts are left padded and, beyond the context, cut from the
        left keeping room for ``max_gen_toks`` (at least half the context stays, :func:`salm.generation.prompt_budget`).
        Greedy unless the task asks ``do_sample``.
        """
        groups = Collator(
            [req.args for req in requests],
            sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
            group_by="gen_kwargs",
            group_fn=lambda x: x[1],
        )
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        res: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="salm generate_until")
        for chunk in groups.get_batched(n=0):  # one chunk per kwargs group; generate() batches inside it
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
            config = DecodeConfig(
                max_new_tokens=int(kwargs["max_gen_toks"]),
                temperature=float(kwargs["temperature"]) if sample else 0.0,
                top_p=float(kwargs.get("top_p") or 1.0),
                top_k=int(kwargs.get("top_k") or 0),
                routing=self.routing_name,
                stop=until,
                seed=self.seed if sample else None,
                truncate="left",
            )
            outs = self.model.generate(list(contexts), config=config, batch_size=self.batch_size, return_outputs=True)
            for context, gen_kwargs, out in zip(contexts, all_kwargs, outs):
                text = postprocess_generated_text(out.text, until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(contexts))
        bar.close()
        return groups.get_original(res)


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def single_member_view(ensemble: Any, k: int) -> Any:
    """The ensemble restricted to member ``k``: a shallow copy whose per-member lists (members, infos, ids, hidden
    sizes, cache kwargs, ...) keep entry ``k`` only. It shares the loaded weights and heads and stops at the same
    EOS ids as the whole ensemble; its router is never consulted (router logits are 0 for its one member)."""
    import copy

    M = len(ensemble.model_ids)
    view = copy.copy(ensemble)  # new __dict__, same modules
    for key, value in list(ensemble.__dict__.items()):
        if isinstance(value, (list, tuple)) and len(value) == M and not key.startswith("_modules"):
            view.__dict__[key] = type(value)([value[k]])
    # The router is never consulted for member k alone, and a confidence/joint router could not be: it reads
    # statistics of every member. The view routes everything to its one member without computing them.
    view.__dict__["confidence_features"] = lambda logits, history=None: None
    view.__dict__["new_history"] = lambda rows: None
    view.__dict__["router_logits"] = lambda hidden, stats=None: torch.zeros(
        *hidden[0].shape[:-1], 1, device=ensemble.device
    )
    return view


def process_state(device: str | None = None) -> Any:
    """accelerate's ``PartialState`` when several processes were launched (``accelerate launch``, ``torchrun``),
    else None. CPU processes (``device="cpu"`` or no GPU) use accelerate's CPU backend, gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate sees {state.num_processes} process(es); "
            "launch with accelerate launch (or torchrun) and a matching device"
        )
    return state


def _load_ensemble(
    models: str | None, weights: str | None, dtype: str | None, device: str | None, trust: bool, warn: bool = True
) -> Any:
    """The ensemble from a member-set file and heads; untrained heads only make sense for ``member:<id>``."""
    from salm.ensemble import load_ensemble

    if not weights and warn:
        logger.warning("salm: no weights= given, the routing heads are UNTRAINED (random): routed scores mean nothing")
    return load_ensemble(models, weights, device=device, dtype=dtype, trust_remote_code=trust)
