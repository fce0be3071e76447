"""How the router behaves: decision patterns in generation and teacher-forced metrics on gold answers.

The maths lives in pure functions on plain sequences and tensors (:func:`decision_patterns`,
:func:`token_scores`, :func:`summarize_sums`) so it can be checked on hand-built cases; the functions
that take a model only batch inputs and feed those.

Teacher-forced quantities, per gold answer token (position t scores token t+1):

* member NLL: ``-log p_m(gold)``;
* ensemble NLL: ``-log sum_m pi_m p_m(gold)``, the router-weighted mixture the training loss optimises;
* routed NLL: ``-log p_{argmax pi}(gold)``, what hard argmax routing would pay;
* oracle NLL: ``min_m -log p_m(gold)``, a router that always knew the best member;
* router agreement: share of tokens where ``argmax pi`` is the oracle's member;
* captured share: ``(NLL_best_member - NLL_ensemble) / (NLL_best_member - NLL_oracle)``, the part of the
  oracle's gain over the best single member that the trained router realises (1 = oracle, 0 = no gain);
* best constant mixture: ``-log sum_m w_m p_m(gold)`` with one weight vector for every token, the baseline a
  per-token router must beat to be worth its cost (:func:`constant_mixture`), with its own captured share.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from salm.data.examples import Example

__all__ = [
    "ContinuationScores",
    "combine_teacher_forced",
    "constant_mixture",
    "fit_constant_mixture",
    "decision_patterns",
    "encode_pairs",
    "kept_decisions",
    "run_lengths",
    "score_continuations",
    "summarize_sums",
    "teacher_forced_metrics",
    "token_scores",
]

# ----------------------------------------------------------------------------------------------------
# Decision patterns in generation
# ----------------------------------------------------------------------------------------------------


def run_lengths(members: Sequence[str]) -> list[tuple[str, int]]:
    """Maximal runs of the same member: ``["a", "a", "b"] -> [("a", 2), ("b", 1)]``."""
    runs: list[tuple[str, int]] = []
    for m in members:
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1] + 1)
        else:
            runs.append((m, 1))
    return runs


def decision_patterns(sequences: Iterable[Sequence[str]], model_ids: Sequence[str]) -> dict[str, Any]:
    """Who emitted the tokens of several generations, and how often the router changed its mind.

    ``sequences`` holds, per generation, the emitting member of each token. Switches and runs are
    counted inside a generation only (the start of the next answer is not a switch). Switches per 100
    tokens = 100 * switches / tokens.
    """
    seqs = [list(s) for s in sequences]
    counts = Counter(m for s in seqs for m in s)
    tokens = sum(counts.values())
    runs = [r for s in seqs for r in run_lengths(s)]
    switches = sum(max(len(run_lengths(s)) - 1, 0) for s in seqs)
    lengths = [n for _, n in runs]
    by_member: dict[str, list[int]] = {m: [] for m in model_ids}
    for m, n in runs:
        by_member.setdefault(m, []).append(n)
    return {
        "sequences": len(seqs),
        "tokens": tokens,
        "tokens_per_member": {m: counts.get(m, 0) for m in model_ids},
        "share": {m: (counts.get(m, 0) / tokens if tokens else 0.0) for m in model_ids},
        "switches": switches,
        "switches_per_100_tokens": 100.0 * switches / tokens if tokens else 0.0,
        "run_length": {
            "runs": len(lengths),
            "mean": statistics.fmean(lengths) if lengths else 0.0,
            "median": float(statistics.median(lengths)) if lengths else 0.0,
            "max": max(lengths, default=0),
            "histogram": {str(k): v for k, v in sorted(Counter(lengths).items())},
            "mean_by_member": {m: (statistics.fmean(v) if v else 0.0) for m, v in by_member.items()},
        },
    }


def kept_decisions(output: Any, tokenizer: Any) -> list[Any]:
    """The decisions of the tokens that survive the stop-string cut of ``output.text``.

    Generation may emit a few tokens of a stop string ("\\nQuestion:") before it notices and cuts the
    text; those tokens are not part of the answer, so they are not counted as the router's decisions.
    """
    decisions = list(output.decisions)
    if getattr(output, "stop_reason", None) != "stop":
        return decisions
    ids = list(output.token_ids)
    k = len(ids)
    while k > 0 and len(tokenizer.decode(ids[:k], skip_special_tokens=True)) > len(output.text):
        k -= 1
    return decisions[:k]


# ----------------------------------------------------------------------------------------------------
# Teacher forcing: tensors -> sums -> metrics
# ----------------------------------------------------------------------------------------------------


def token_scores(
    gold_logprobs: torch.Tensor, router_logits: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-row sums over the masked positions of a [B, L, M] batch (all log-probs, natural log).

    Returns ``member`` [B, M] (sum log p_m), ``mixture`` [B] (sum log sum_m pi_m p_m), ``routed`` [B]
    (sum log p of the argmax-routed member), ``oracle`` [B] (sum max_m log p_m), ``agreement`` [B]
    (tokens where argmax pi is the oracle's member), ``routed_to`` [B, M] (tokens the argmax router gives
    each member), ``router_prob`` [B, M] (sum of each member's routing probability) and ``tokens`` [B].
    """
    gold = gold_logprobs.float()
    m = mask.bool().unsqueeze(-1)
    log_pi = F.log_softmax(router_logits.float(), dim=-1)
    routed_idx = router_logits.argmax(-1, keepdim=True)
    oracle_val, oracle_idx = gold.max(-1)
    mf = mask.float()
    return {
        "member": gold.masked_fill(~m, 0.0).sum(1),
        "mixture": (torch.logsumexp(log_pi + gold, dim=-1) * mf).sum(1),
        "routed": (gold.gather(-1, routed_idx).squeeze(-1) * mf).sum(1),
        "oracle": (oracle_val * mf).sum(1),
        "agreement": ((routed_idx.squeeze(-1) == oracle_idx).float() * mf).sum(1),
        "routed_to": (F.one_hot(routed_idx.squeeze(-1), gold.size(-1)).float() * mf.unsqueeze(-1)).sum(1),
        "router_prob": (log_pi.exp() * mf.unsqueeze(-1)).sum(1),
        "tokens": mf.sum(1),
    }


def _empty_sums(model_ids: Sequence[str]) -> dict[str, Any]:
    return {
        "member_nll": {m: 0.0 for m in model_ids},
        "ensemble_nll": 0.0,
        "routed_nll": 0.0,
        "oracle_nll": 0.0,
        "agreement": 0,
        "routed_to": {m: 0 for m in model_ids},
        "router_prob": {m: 0.0 for m in model_ids},
        "tokens": 0,
        "sequences": 0,
    }


def _add_scores(sums: dict[str, Any], scores: Mapping[str, torch.Tensor], model_ids: Sequence[str]) -> None:
    for i, mid in enumerate(model_ids):
        sums["member_nll"][mid] += -float(scores["member"][:, i].sum())
        sums["routed_to"][mid] += int(round(float(scores["routed_to"][:, i].sum())))
        sums["router_prob"][mid] += float(scores["router_prob"][:, i].sum())
    sums["ensemble_nll"] += -float(scores["mixture"].sum())
    sums["routed_nll"] += -float(scores["routed"].sum())
    sums["oracle_nll"] += -float(scores["oracle"].sum())
    sums["agreement"] += int(round(float(scores["agreement"].sum())))
    sums["tokens"] += int(round(float(scores["tokens"].sum())))
    sums["sequences"] += int((scores["tokens"] > 0).sum())


def summarize_sums(sums: Mapping[str, Any]) -> dict[str, Any]:
    """Per-token means and the oracle comparison from summed NLLs (the ``sums`` block is kept inside).

    ``captured_share`` is None when the oracle gains nothing over the best member (the denominator is
    ~0), where the ratio has no meaning.
    """
    n = int(sums["tokens"])
    mean = (lambda x: x / n) if n else (lambda x: 0.0)
    member = {m: mean(v) for m, v in sums["member_nll"].items()}
    best = min(member.items(), key=lambda kv: (kv[1], kv[0]))[0] if member else None
    ens, oracle = mean(sums["ensemble_nll"]), mean(sums["oracle_nll"])
    best_nll = member[best] if best is not None else 0.0
    gap = best_nll - oracle
    return {
        "tokens": n,
        "sequences": int(sums["sequences"]),
        "member_nll": member,
        "ensemble_nll": ens,
        "routed_nll": mean(sums["routed_nll"]),
        "oracle_nll": oracle,
        "best_member": best,
        "best_member_nll": best_nll,
        "router_agreement": sums["agreement"] / n if n else 0.0,
        # Where the argmax router sends the gold tokens, and the mean routing probability per member.
        "router_share": {m: mean(float(v)) for m, v in sums["routed_to"].items()},
        "router_prob_mean": {m: mean(v) for m, v in sums["router_prob"].items()},
        "captured_share": (best_nll - ens) / gap if n and gap > 1e-9 else None,
        "sums": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in sums.items()},
    }


def combine_teacher_forced(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool several :func:`teacher_forced_metrics` results (e.g. domains) token-weighted, via their sums."""
    results = list(results)
    if not results:
        raise ValueError("nothing to combine")
    total = _empty_sums(list(results[0]["sums"]["member_nll"]))
    for r in results:
        s = r["sums"]
        for key in ("member_nll", "routed_to", "router_prob"):
            for m, v in s[key].items():
                total[key][m] = total[key].get(m, 0) + v
        for k in ("ensemble_nll", "routed_nll", "oracle_nll", "agreement", "tokens", "sequences"):
            total[k] += s[k]
    return summarize_sums(total)


def fit_constant_mixture(logprobs: torch.Tensor, iters: int = 1000, tol: float = 1e-10) -> torch.Tensor:
    """The weights ``w`` (on the simplex) maximising ``sum_t log sum_m w_m p_m(t)`` for token log-probs ``[T, M]``.

    The objective is concave in ``w``, so EM (``w <- mean_t posterior_t``) converges to the global optimum;
    no grid is needed and any number of members works.
    """
    lp = logprobs.double()
    M = lp.shape[-1]
    w = torch.full((M,), 1.0 / M, dtype=torch.float64)
    if lp.shape[0] == 0:
        return w.float()
    prev = math.inf
    for _ in range(iters):
        joint = lp + w.clamp_min(1e-300).log()
        nll = -float(torch.logsumexp(joint, dim=-1).mean())
        w = torch.softmax(joint, dim=-1).mean(0)
        if prev - nll < tol:
            break
        prev = nll
    return w.float()


def _mixture_nll_sum(logprobs: torch.Tensor, weights: torch.Tensor) -> float:
    return -float(torch.logsumexp(logprobs.double() + weights.double().clamp_min(1e-300).log(), dim=-1).sum())


def constant_mixture(
    logprobs: torch.Tensor,
    rows: torch.Tensor,
    model_ids: Sequence[str],
    best_member_nll: float,
    oracle_nll: float,
    fit_logprobs: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The best constant mixture of the members on gold tokens ``[T, M]`` (``rows`` [T]: the sequence of each).

    Weights are fitted on ``fit_logprobs`` (e.g. the validation split's tokens) when given; otherwise by 2-fold
    cross-fitting over sequences (even/odd), so every test token is scored with weights fitted on other
    sequences. ``nll_in_hindsight`` (weights fitted on the test tokens themselves) is the best any constant
    mixture could do here. ``captured_share`` compares it with the oracle like the router's.
    """
    T = logprobs.shape[0]
    if T == 0:
        return {"weights": {m: 1.0 / len(model_ids) for m in model_ids}, "nll": 0.0, "captured_share": None}
    hindsight = fit_constant_mixture(logprobs)
    folds = rows.long() % 2
    if fit_logprobs is not None:
        weights = fit_constant_mixture(fit_logprobs)
        nll, how = _mixture_nll_sum(logprobs, weights) / T, "fitted on the given fit tokens (validation)"
    elif bool((folds == 0).any()) and bool((folds == 1).any()):
        total = 0.0
        for f in (0, 1):
            w_f = fit_constant_mixture(logprobs[folds != f])
            total += _mixture_nll_sum(logprobs[folds == f], w_f)
        weights, nll, how = hindsight, total / T, "2-fold cross-fitted over sequences (weights: fitted on all)"
    else:
        weights, nll, how = hindsight, _mixture_nll_sum(logprobs, hindsight) / T, "fitted on these tokens (1 sequence)"
    gap = best_member_nll - oracle_nll
    return {
        "weights": {m: float(v) for m, v in zip(model_ids, weights.tolist())},
        "nll": nll,
        "nll_in_hindsight": _mixture_nll_sum(logprobs, hindsight) / T,
        "fit": how,
        "captured_share": (best_member_nll - nll) / gap if gap > 1e-9 else None,
    }


# ----------------------------------------------------------------------------------------------------
# Teacher forcing with a model
# ----------------------------------------------------------------------------------------------------


def encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int | None
) -> list[tuple[list[int], int]]:
    """(context, continuation) -> (token ids, number of continuation tokens at the end).

    Context and continuation are tokenized apart (lm-eval style) so the continuation's tokens are the
    same whatever precedes them. Beyond ``max_length`` the context is cut from the left; a continuation
    longer than the whole window keeps its first tokens.
    """
    out = []
    for context, continuation in pairs:
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if max_length is not None and len(ctx) + len(cont) > max_length:
            cont = cont[: max_length - 1]
            ctx = ctx[-(max_length - len(cont)) :]
        out.append((ctx + cont, len(cont)))
    return out


@dataclass
class ContinuationScores:
    """Per (context, continuation) pair: summed log-probs of the continuation tokens."""

    model_ids: list[str]
    member: torch.Tensor  # [R, M] sum log p_m
    mixture: torch.Tensor  # [R] sum log sum_m pi_m p_m (the ensemble)
    routed: torch.Tensor  # [R] sum log p of the argmax-routed member
    oracle: torch.Tensor  # [R]
    agreement: torch.Tensor  # [R]
    routed_to: torch.Tensor  # [R, M] tokens the argmax router gives each member
    router_prob: torch.Tensor  # [R, M] summed routing probabilities
    tokens: torch.Tensor  # [R]
    token_logprobs: torch.Tensor | None = None  # [T, M] every member's log p of each scored token
    token_rows: torch.Tensor | None = None  # [T] the pair each of those tokens belongs to

    def sums(self) -> dict[str, Any]:
        sums = _empty_sums(self.model_ids)
        _add_scores(sums, {k: v for k, v in self.__dict__.items() if not k.startswith("token_")}, self.model_ids)
        return sums


def _batches(
    model: Any, encoded: list[tuple[list[int], int]], batch_size: int, progress: bool, desc: str
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Right-padded teacher-forced batches (longest first, so padding stays small) -> per-row scores."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc=desc, unit="seq", leave=False)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                seq, n_cont = encoded[i]
                ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[r, : len(seq)] = 1
                if n_cont:
                    labels[r, len(seq) - n_cont : len(seq)] = torch.tensor(seq[len(seq) - n_cont :], dtype=torch.long)
            with torch.no_grad():
                out = model.forward(ids, attention_mask=mask, labels=labels)
            scores = token_scores(out.gold_logprobs, out.router_logits, out.loss_mask)
            scores["token_logprobs"] = out.gold_logprobs[out.loss_mask].float()
            scores["token_rows"] = out.loss_mask.nonzero()[:, 0]  # batch-local row of each scored token
            yield rows, scores
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()


def score_continuations(
    model: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
) -> ContinuationScores:
    """Teacher-forced log-likelihood of each continuation given its context, for every member and the
    ensemble at once (one ensemble forward pass yields all members' log-probs)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    encoded = encode_pairs(model.tokenizer, pairs, model.context_length)
    R, M = len(pairs), len(model.model_ids)
    res = {k: torch.zeros(R) for k in ("mixture", "routed", "oracle", "agreement", "tokens")}
    for k in ("member", "routed_to", "router_prob"):
        res[k] = torch.zeros(R, M)
    token_lp, token_rows = [], []
    try:
        for rows, scores in _batches(model, encoded, batch_size, progress, desc):
            idx = torch.tensor(rows, dtype=torch.long)
            for k in res:
                res[k][idx] = scores[k].detach().cpu()
            token_lp.append(scores["token_logprobs"].detach().cpu())
            token_rows.append(idx[scores["token_rows"].cpu()])
    finally:
        model.train(was_training)
    return ContinuationScores(
        list(model.model_ids),
        **res,
        token_logprobs=torch.cat(token_lp) if token_lp else torch.zeros(0, M),
        token_rows=torch.cat(token_rows) if token_rows else torch.zeros(0, dtype=torch.long),
    )


def teacher_forced_metrics(
    model: Any,
    items: Sequence[Example | tuple[str, str]],
    batch_size: int = 8,
    prompt: Callable[[Example], str] | None = None,
    target: Callable[[Example], str] | None = None,
    progress: bool = False,
    desc: str = "teacher forcing",
    fit_items: Sequence[Example | tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Member / ensemble / routed / oracle NLL per gold token, router agreement and captured share, and the
    best constant mixture of the members (:func:`constant_mixture`; fitted on ``fit_items`` when given, e.g.
    the validation split, else cross-fitted over the items).

    ``items`` are Examples (scored on ``target(ex)`` given ``prompt(ex)``, by default ``ex.answer``
    given ``ex.prompt``) or ready (context, continuation) pairs. Labels cover only the answer tokens.
    The result's ``sums`` block lets callers pool several calls (:func:`combine_teacher_forced`).
    """
    prompt = prompt or (lambda ex: ex.prompt)
    target = target or (lambda ex: ex.answer)
    pairs = [it if isinstance(it, tuple) else (prompt(it), target(it)) for it in items]
    if not pairs:
        return summarize_sums(_empty_sums(model.model_ids))
    scores = score_continuations(model, pairs, batch_size, progress, desc)
    result = summarize_sums(scores.sums())
    fit = None
    if fit_items:
        fit_pairs = [it if isinstance(it, tuple) else (prompt(it), target(it)) for it in fit_items]
        fit = score_continuations(model, fit_pairs, batch_size, progress, f"{desc} (fit)").token_logprobs
    result["constant_mixture"] = constant_mixture(
        scores.token_logprobs,
        scores.token_rows,
        model.model_ids,
        result["best_member_nll"],
        result["oracle_nll"],
        fit,
    )
    return result
