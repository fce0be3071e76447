"""The lm-eval adapter: log-likelihoods against a direct computation, and equivalence with lm-eval's own ``hf``."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'salm[harness]')")

from salm.harness import task_manager  # noqa: E402
from salm.harness.adapter import SalmLM  # noqa: E402
from tests.conftest import write_task_data  # noqa: E402

PAIRS = [
    ("Question: what is two plus three?\nAnswer:", " 5"),
    ("The patient presented with", " fever and cough"),
    ("def add(a, b):\n    return", " a + b"),
    ("", "The quick brown fox"),  # empty context: conditioned on BOS/EOS, as lm-eval does
    ("Tom has 12 apples. He gives 4 to Ann", " and buys 7 more. 12 - 4 = 8."),
]


def _greedy_pair(lm) -> tuple[str, str]:
    """A (context, continuation) whose continuation is the routed argmax token and survives re-tokenization."""
    for ctx, _ in PAIRS[:3] + PAIRS[4:]:
        ids = lm.tok_encode(ctx)
        with torch.no_grad():
            out = lm.model(torch.tensor([ids]))
        logp = out.logprobs[0, -1]  # [M, V]
        pi = out.routing_probs[0, -1]
        if lm.routing.mode == "mixture":
            tok = int(torch.logsumexp(pi.log()[:, None] + logp, dim=0).argmax())
        else:
            tok = int(logp[lm.routing.member].argmax())
        cont = lm.tok_decode([tok])
        if lm.tok_encode(ctx + cont) == ids + [tok]:
            return ctx, cont
    raise AssertionError("no stable greedy continuation found")


def _requests(pairs):
    return [SimpleNamespace(args=p) for p in pairs]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    return write_task_data(tmp_path_factory.mktemp("taskdata"))


def _direct(ensemble, ctx_ids: list[int], cont_ids: list[int], routing: str) -> float:
    """Each member run alone on the whole sequence; routing computed by hand from the heads."""
    ids = torch.tensor([ctx_ids + cont_ids])
    logps, hidden = [], []
    with torch.no_grad():
        for m in ensemble.members:
            out = m(ids, output_hidden_states=True)
            logps.append(F.log_softmax(out.logits[0, :, : ensemble.vocab_size].float(), dim=-1))
            hidden.append(out.hidden_states[-1][0])
        probs = torch.softmax(ensemble.router_logits(hidden), dim=-1)  # [L, M]
    total = 0.0
    for t in range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1):
        tok = ids[0, t + 1]
        p = torch.stack([lp[t, tok] for lp in logps]).exp()  # [M]
        if routing == "mixture":
            total += math.log(float((probs[t] * p).sum()))
            continue
        if routing == "argmax":
            k = int(probs[t].argmax())
        elif routing.startswith("threshold:"):
            others = probs[t].clone()
            others[0] = -1
            k = int(others.argmax()) if float(others.max()) > float(routing.split(":")[1]) else 0
        else:
            k = ensemble.model_ids.index(routing.split(":", 1)[1])
        total += math.log(float(p[k]))
    return total


@pytest.mark.parametrize("routing", ["mixture", "argmax", "threshold:0.34", "member:tiny-1"])
def test_loglikelihood_equals_direct_computation(tiny_ensemble, routing):
    lm = SalmLM(ensemble=tiny_ensemble, routing=routing, batch_size=2)
    got = lm.loglikelihood(_requests(PAIRS), disable_tqdm=True)
    for (ctx, cont), (lp, _) in zip(PAIRS, got):
        ctx_ids, cont_ids = (
            lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False))
        )
        # 1e-5 per continuation token: the sums reach -150 nats on random members, near fp32's resolution.
        want = _direct(tiny_ensemble, ctx_ids, cont_ids, routing)
        assert lp == pytest.approx(want, abs=1e-5 * len(cont_ids)), (ctx, cont)


def test_routing_modes_really_differ(tiny_ensemble):
    scores = {
        r: [lp for lp, _ in SalmLM(ensemble=tiny_ensemble, routing=r).loglikelihood(_requests(PAIRS), True)]
        for r in ("mixture", "argmax", "member:tiny-0", "member:tiny-1")
    }
    assert len({tuple(round(x, 4) for x in v) for v in scores.values()}) == 4


def test_member_loglikelihood_and_greedy_equal_lm_evals_hf(tiny_ensemble, tiny_infos):
    """``member:<id>`` = lm-eval's HFLM on that member's folder: log-probs and is_greedy, including a greedy hit."""
    from lm_eval.models.huggingface import HFLM

    k = 2
    hf = HFLM(pretrained=tiny_infos[k].path, device="cpu", batch_size=3)
    ours = SalmLM(ensemble=tiny_ensemble, routing=f"member:{tiny_infos[k].id}", batch_size=3)
    pairs = PAIRS + [_greedy_pair(ours)]
    want = hf.loglikelihood(_requests(pairs), disable_tqdm=True)
    got = ours.loglikelihood(_requests(pairs), disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want] and got[-1][1] is True
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-6, abs=1e-5)
    text = [SimpleNamespace(args=(" ".join(c for c, _ in PAIRS) * 3,))]
    assert ours.loglikelihood_rolling(text, True) == pytest.approx(hf.loglikelihood_rolling(text, True), abs=1e-4)


def test_mixture_greedy_flag_follows_the_mixture(tiny_ensemble):
    lm = SalmLM(ensemble=tiny_ensemble, routing="mixture")
    ctx, cont = _greedy_pair(lm)
    member_greedy = SalmLM(ensemble=tiny_ensemble, routing="member:tiny-0").loglikelihood(
        _requests([(ctx, cont)]), True
    )
    assert lm.loglikelihood(_requests([(ctx, cont)]), True)[0][1] is True
    assert lm.loglikelihood(_requests([(ctx, cont + cont)]), True)[0][1] in (True, False)  # runs on 2 tokens
    assert isinstance(member_greedy[0][1], bool)


def test_bad_arguments_are_named(tiny_ensemble):
    with pytest.raises(ValueError, match="batch_size=auto"):
        SalmLM(ensemble=tiny_ensemble, batch_size="auto")
    with pytest.raises(ValueError, match="unknown member 'nope'"):
        SalmLM(ensemble=tiny_ensemble, routing="member:nope")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):  # was silently the default 8
        SalmLM(ensemble=tiny_ensemble, batch_size=0)
    with pytest.raises(ValueError, match="max_gen_toks must be >= 1, got 0"):
        SalmLM(ensemble=tiny_ensemble, max_gen_toks=0)
    assert SalmLM(ensemble=tiny_ensemble, batch_size=None).batch_size == 8


def _simple_evaluate(lm, tasks, data, **kw):
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager(data, include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        **kw,
    )


def test_equivalence_with_hf_on_local_tasks(tiny_ensemble, tiny_infos, task_data):
    """Same accuracy on a log-likelihood task and the same greedy generations as lm-eval's ``hf`` model."""
    from lm_eval.models.huggingface import HFLM

    tasks = ["medqa_4options_local", "gsm8k_local", "boolq_local"]
    kw = dict(num_fewshot=2, gen_kwargs="max_gen_toks=12")
    ours = _simple_evaluate(
        SalmLM(ensemble=tiny_ensemble, routing="member:tiny-0", batch_size=4), tasks, task_data, **kw
    )
    ref = _simple_evaluate(HFLM(pretrained=tiny_infos[0].path, device="cpu", batch_size=4), tasks, task_data, **kw)
    for task in ("medqa_4options_local", "boolq_local"):
        assert ours["results"][task]["acc,none"] == ref["results"][task]["acc,none"]
        for a, b in zip(ours["samples"][task], ref["samples"][task]):
            assert a["arguments"] == b["arguments"]
            assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-5)
    gen_ours = [s["resps"][0][0] for s in ours["samples"]["gsm8k_local"]]
    gen_ref = [s["resps"][0][0] for s in ref["samples"]["gsm8k_local"]]
    assert gen_ours == gen_ref and any(gen_ours)
    assert [s["arguments"] for s in ours["samples"]["gsm8k_local"]] == [
        s["arguments"] for s in ref["samples"]["gsm8k_local"]
    ]
    for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert ours["results"]["gsm8k_local"][metric] == ref["results"]["gsm8k_local"][metric]


def test_generate_until_stops_at_until_strings(tiny_ensemble):
    lm = SalmLM(ensemble=tiny_ensemble, routing="argmax")
    ctx = "Question: what is two plus three?\nAnswer:"
    free = lm.generate_until([SimpleNamespace(args=(ctx, {"until": [], "max_gen_toks": 12}))], True)[0]
    assert len(free) > 2
    stop = free[1:3]
    cut = lm.generate_until([SimpleNamespace(args=(ctx, {"until": [stop], "max_gen_toks": 12}))], True)[0]
    assert cut == free[: free.index(stop)]


def test_offline_task_data_missing_is_a_clear_error(tmp_path):
    from salm.harness.tasks import salm_local

    with pytest.raises(FileNotFoundError, match=r"gsm8k/train.jsonl not found; .*--data_dir"):
        salm_local.gsm8k(data_dir=str(tmp_path))


def test_a_member_runs_alone_through_the_same_code(tiny_ensemble):
    """member:<id> uses a one-member view of the ensemble: same outputs as the full ensemble's member routing."""
    from salm.harness.adapter import single_member_view

    view = single_member_view(tiny_ensemble, 1)
    assert view.model_ids == ["tiny-1"] and view.members == [tiny_ensemble.members[1]]
    assert tiny_ensemble.model_ids == ["tiny-0", "tiny-1", "tiny-2"] and len(tiny_ensemble.members) == 3
    prompts = [p for p, _ in PAIRS[:3]]
    full = tiny_ensemble.generate(prompts, max_new_tokens=6, temperature=0, routing="member:tiny-1")
    assert view.generate(prompts, max_new_tokens=6, temperature=0, routing="member:tiny-1") == full


@pytest.mark.parametrize("routing", ["mixture", "member:tiny-2"])
def test_options_differing_in_their_last_token_share_one_pass(tiny_ensemble, routing):
    """The logits cache (one pass scores options differing in their last token) = scoring each option alone."""
    lm = SalmLM(ensemble=tiny_ensemble, routing=routing, batch_size=3)
    ctx = "Question: what is two plus three?\nAnswer:"
    options = [lm.tok_decode([t]) for t in range(20, 60)]
    one = [(ctx, o) for o in options if len(lm._encode_pair(ctx, o)[1]) == 1][:6]
    first = lm._encode_pair(ctx, one[0][1])[1]
    two = [(ctx, one[0][1] + o) for o in options if lm._encode_pair(ctx, one[0][1] + o)[1][:1] == first]
    two = [p for p in two if len(lm._encode_pair(*p)[1]) == 2][:4]
    assert len(one) > 3 and len(two) > 2
    pairs = one + two + PAIRS + [_greedy_pair(lm)]
    cached = lm.loglikelihood(_requests(pairs), True)
    lm.logits_cache = False
    alone = lm.loglikelihood(_requests(pairs), True)
    assert [lp for lp, _ in cached] == pytest.approx([lp for lp, _ in alone], rel=1e-6, abs=1e-5)
    assert [g for _, g in cached] == [g for _, g in alone] and cached[-1][1] is True


@pytest.mark.parametrize("router", ["confidence", "joint", "aware", "evidence"])
def test_member_routing_works_with_routers_that_read_every_members_statistics(tiny_ensemble, tiny_infos, router):
    """A confidence/joint/aware router needs every member's statistics; member:<id> must not consult it at all."""
    from salm.ensemble import MultiModelWithScalarHeads

    ens = MultiModelWithScalarHeads(
        tiny_infos, members=tiny_ensemble.members, tokenizer=tiny_ensemble.tokenizer, router=router
    ).eval()
    seed_lm = SalmLM(ensemble=tiny_ensemble, routing="member:tiny-1", batch_size=3)
    lm = SalmLM(ensemble=ens, routing="member:tiny-1", batch_size=3)
    assert lm.loglikelihood(_requests(PAIRS), disable_tqdm=True) == seed_lm.loglikelihood(
        _requests(PAIRS), disable_tqdm=True
    )
    routed = SalmLM(ensemble=ens, routing="mixture", batch_size=3)
    assert len(routed.loglikelihood(_requests(PAIRS), disable_tqdm=True)) == len(PAIRS)
