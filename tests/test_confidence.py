"""Self-aware routing: the confidence statistics, the router variants, and the disagreement-weighted loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from salm.confidence import (
    HISTORY_DECAY,
    LOGPROB_FLOOR,
    History,
    confidence_stats,
    disagreement,
    history_dim,
    history_names,
    history_over,
    stats_dim,
    stats_names,
)
from salm.ensemble import MultiModelWithScalarHeads
from salm.features import TokenizedSplit, load_or_build
from salm.heads import ROUTERS, ScalarProjectionHead
from salm.loss import disagreement_weights, perfect_alignment_loss
from tests.conftest import batch, fresh, seed_state

PROMPTS = ["Question: what is two plus three?\nAnswer:\n", "def add"]


def test_stats_by_hand():
    """Two members over four tokens: every column against a direct computation."""
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1]])
    s = confidence_stats(p.log()[None] + 3.0)[0]  # logits up to a constant: the same distribution
    assert s.shape == (stats_dim(2),) == (len(stats_names(["a", "b"])),) == (11,)
    cross = s[:4].view(2, 2)  # cross[m, k] = log p_m(argmax_k); argmax = (0, 1)
    expected = torch.tensor([[0.7, 0.1], [0.2, 0.5]]).log()
    torch.testing.assert_close(cross, expected)
    torch.testing.assert_close(s[4:6], -(p * p.log()).sum(-1))  # entropies
    torch.testing.assert_close(s[6:8], torch.tensor([math.log(7), math.log(2.5)]))  # top1 - top2 log-prob
    torch.testing.assert_close(s[8:10], torch.tensor([math.log(0.3), math.log(0.5)]))  # log(1 - p_top1)
    assert s[10] == 0.0 and bool(disagreement(s))
    agree = confidence_stats(torch.stack([p[0], p[0]]).log())
    assert agree[-1] == 1.0 and not bool(disagreement(agree))


def test_stats_are_finite_for_masked_tokens():
    logits = torch.tensor([[[0.0, float("-inf"), 5.0]], [[0.0, 2.0, float("-inf")]]]).transpose(0, 1)  # [1, 2, 3]
    s = confidence_stats(logits)
    assert torch.isfinite(s).all()
    assert s[0, 1] == LOGPROB_FLOOR  # member 0's log-prob of member 1's argmax (token 1: -inf) is clamped


def test_loss_weights():
    torch.manual_seed(0)
    rl, gold = torch.randn(6, 3), torch.randn(6, 3).clamp(max=0)
    stats = torch.zeros(6, stats_dim(3))
    stats[:3, -1] = 1.0  # the first three positions agree
    plain = perfect_alignment_loss(rl, gold, entropy_weight=0.1)
    assert disagreement_weights(stats, 1.0) is None
    w = disagreement_weights(stats, 4.0)
    assert w.tolist() == [1.0, 1.0, 1.0, 4.0, 4.0, 4.0]
    weighted = perfect_alignment_loss(rl, gold, entropy_weight=0.1, weights=w)
    torch.testing.assert_close(weighted.nll, plain.nll)  # reported NLL stays the plain mean
    per = perfect_alignment_loss(rl, gold, entropy_weight=0.1, mask=torch.eye(6, dtype=torch.bool)[3]).loss
    manual = (
        sum(
            perfect_alignment_loss(rl, gold, entropy_weight=0.1, mask=torch.eye(6, dtype=torch.bool)[i]).loss * w[i]
            for i in range(6)
        )
        / w.sum()
    )
    torch.testing.assert_close(weighted.loss, manual)
    assert not torch.isclose(weighted.loss, plain.loss) and per.shape == ()


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_saves_and_loads(tiny_ensemble, tmp_path, router):
    ens = fresh(tiny_ensemble, seed=5, router=router)
    ens.save_pretrained(tmp_path / "heads")
    assert json.loads((tmp_path / "heads" / "salm_config.json").read_text())["heads"]["router"] == router
    loaded = MultiModelWithScalarHeads.from_pretrained(weights_path=tmp_path / "heads", device="cpu")
    assert loaded.router == router
    ids, mask = batch(ens, PROMPTS)
    torch.testing.assert_close(loaded(ids, mask).router_logits, ens(ids, mask).router_logits)
    # A bare .pt state dict (what training writes as best_model_heads.pt) says its own variant.
    torch.save(ens.state_dict(), tmp_path / "h.pt")
    from_pt = MultiModelWithScalarHeads.from_pretrained(
        weights_path=tmp_path / "h.pt", base_models=ens.infos, device="cpu", head_hidden_dim=256
    )
    assert from_pt.router == router
    torch.testing.assert_close(from_pt(ids, mask).router_logits, ens(ids, mask).router_logits)
    gen = dict(max_new_tokens=6, temperature=0, return_outputs=True)
    assert [o.token_ids for o in loaded.generate(PROMPTS, **gen)] == [o.token_ids for o in ens.generate(PROMPTS, **gen)]


def test_heads_read_the_stats(tiny_ensemble):
    """The confidence and joint routers' scores change with the statistics; seed heads ignore them."""
    ids, mask = batch(tiny_ensemble, PROMPTS)
    hidden, _, stats, m = tiny_ensemble.member_features(ids, mask, ids.masked_fill(mask == 0, -100))
    for router in ROUTERS:
        ens = fresh(tiny_ensemble, seed=1, router=router)
        a, b = ens.router_logits(hidden, stats), ens.router_logits(hidden, stats + 1.0)
        assert torch.equal(a, b) == (router == "seed"), router
        if router != "seed":
            with pytest.raises(ValueError, match="confidence statistics"):
                ens.router_logits(hidden)


def test_the_evidence_router_is_blind_to_hidden_states(tiny_ensemble):
    """``evidence`` routes on the statistics and the record alone: other hidden states, the same scores; the
    ``aware`` router, which reads both, changes."""
    ids, mask = batch(tiny_ensemble, PROMPTS)
    hidden, _, stats, _ = tiny_ensemble.member_features(ids, mask, ids.masked_fill(mask == 0, -100))
    other = [torch.randn_like(h) for h in hidden]
    for router, blind in (("evidence", True), ("aware", False)):
        ens = fresh(tiny_ensemble, seed=3, router=router)
        assert torch.equal(ens.router_logits(hidden, stats), ens.router_logits(other, stats)) == blind, router


def test_seed_pt_heads_route_identically(tiny_ensemble, tmp_path):
    """The seed's .pt heads (and folders saved before ``router`` existed) load as seed heads, unchanged."""
    state = seed_state(tiny_ensemble, tiny_ensemble.model_ids)
    torch.save(state, tmp_path / "best_model_heads.pt")
    ens = MultiModelWithScalarHeads.from_pretrained(
        base_models=tiny_ensemble.infos, weights_path=tmp_path / "best_model_heads.pt", device="cpu"
    )
    assert ens.router == "seed" and ens.head_norm == "batch"
    assert set(ens.state_dict()) == set(state)  # no new tensor in the seed layout
    ids, mask = batch(ens, PROMPTS)
    hidden = ens(ids, mask, return_hidden_states=True).hidden_states
    ref = []
    for mid, h in zip(ens.model_ids, hidden):  # the seed's computation: each head on its member's hidden state
        head = ScalarProjectionHead(h.shape[-1], 256, norm="batch")
        head.load_state_dict(
            {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"projection_heads.{mid}.")}
        )
        ref.append(head.eval()(h))
    torch.testing.assert_close(ens(ids, mask).router_logits, torch.stack(ref, -1))
    # An older saLM folder: flat head keys in salm_config.json, written before "router" existed.
    ens.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "salm_config.json").read_text())
    heads = cfg.pop("heads")
    cfg.update(head_hidden_dim=heads["hidden_dim"], head_dropout=heads["dropout"], head_norm=heads["norm"])
    (tmp_path / "old" / "salm_config.json").write_text(json.dumps(cfg))
    old = MultiModelWithScalarHeads.from_pretrained(weights_path=tmp_path / "old", device="cpu")
    assert old.router == "seed"
    gen = dict(max_new_tokens=6, temperature=0, return_decisions=True)
    assert old.generate(PROMPTS, **gen) == ens.generate(PROMPTS, **gen)


@pytest.mark.parametrize("router", ["confidence", "aware"])
def test_generation_sees_the_stats_extraction_stores(tiny_ensemble, tmp_path, router):
    """Training and inference see the same router inputs: the statistics generation computes at each step
    equal the ones the feature cache stores for the same text (prompt + the generated answer); for the
    ``aware`` router that includes each member's record on the prompt and the tokens generated so far."""
    ens = fresh(tiny_ensemble, seed=2, router=router)
    seen: list[torch.Tensor] = []
    real = ens.confidence_features

    def spy(logits, history=None):
        out = real(logits, history)
        seen.append(out.clone())
        return out

    ens.confidence_features = spy
    outs = [ens.generate([p], max_new_tokens=8, temperature=0, return_outputs=True)[0] for p in PROMPTS]
    del ens.confidence_features
    # The cache of prompt + generated ids (+ EOS), labelled as tokenize_examples labels answers.
    split = TokenizedSplit("gen", [], [], [], [])
    steps = []
    for i, (prompt, o) in enumerate(zip(PROMPTS, outs)):
        assert len(o.token_ids) >= 2 and o.stop_reason == "length"  # random members: no early EOS
        p = ens.tokenizer(prompt)["input_ids"]
        a = o.token_ids + [ens.tokenizer.eos_token_id]
        split.input_ids.append(p + a)
        split.labels.append([-100] * len(p) + a)
        split.datasets.append("gen")
        split.example_ids.append(str(i))
        steps.append(torch.cat(seen[: len(o.token_ids)]))
        del seen[: len(o.token_ids)]
    cache = load_or_build(ens, split, tmp_path, max_length=128, loss_on="answer", progress=False)
    for i, o in enumerate(outs):
        _, _, stored = cache.batch([i])
        # Position t routes token t+1: the stored rows before each generated token, EOS row excluded.
        assert steps[i].shape[-1] == ens.stats_width
        # The cache stores the widest rows (history, then statistics); each router reads its last columns.
        torch.testing.assert_close(stored[: len(o.token_ids), -ens.stats_width :], steps[i], rtol=1e-4, atol=1e-4)


def test_history_by_hand():
    """The record (mean log-prob so far) and the recent average, against a direct computation; rows that
    are not valid keep their state; observing under logits equals updating with the tokens' log-probs."""
    lp = torch.tensor([[[-1.0, -2.0], [-3.0, -0.5], [-2.0, -2.0]]])  # [1, L=3, M=2]
    valid = torch.tensor([[False, True, True]])  # position 0 has no log-prob
    f = history_over(lp, valid)[0]
    assert f.shape == (3, history_dim(2)) and len(history_names(["a", "b"])) == 4
    assert f[0].tolist() == [0.0, 0.0, 0.0, 0.0]  # nothing read yet
    torch.testing.assert_close(f[1], torch.tensor([-3.0, -0.5, -3.0, -0.5]))
    d = HISTORY_DECAY
    torch.testing.assert_close(f[2], torch.tensor([-2.5, -1.25, d * -3.0 + (1 - d) * -2.0, d * -0.5 + (1 - d) * -2.0]))
    logits = torch.randn(2, 2, 7)
    tokens = torch.tensor([3, 5])
    a, b = History(2, 2), History(2, 2)
    a.observe(logits, tokens)
    b.update(torch.log_softmax(logits, -1)[torch.arange(2), :, tokens])
    torch.testing.assert_close(a.features(), b.features())


@pytest.mark.parametrize("path", [dict(use_cache=False), dict(cache_implementation="static")])
def test_aware_generation_paths_agree(tiny_ensemble, path):
    """The aware router's history is kept three ways (grown with a dynamic cache, recomputed from the whole
    sequence without one, carried with static caches); greedy decisions are identical, batched or not."""
    ens = fresh(tiny_ensemble, seed=4, router="aware")
    prompts = [*PROMPTS, "Question: and five?\nAnswer:"]
    gen = dict(max_new_tokens=7, temperature=0, return_decisions=True)

    def same(a: list[dict], b: list[dict]) -> None:  # tokens and members exactly, routing probs to float noise
        for x, y in zip(a, b, strict=True):
            assert x["token_ids"] == y["token_ids"]
            assert [d["member"] for d in x["decisions"]] == [d["member"] for d in y["decisions"]]
            px = torch.tensor([list(d["routing_probs"].values()) for d in x["decisions"]])
            py = torch.tensor([list(d["routing_probs"].values()) for d in y["decisions"]])
            torch.testing.assert_close(px, py, rtol=1e-4, atol=1e-5)

    ref = ens.generate(prompts, **gen)
    same(ens.generate(prompts, **gen, **path), ref)
    same([ens.generate([p], **gen)[0] for p in prompts], ref)  # batched (left-padded) = alone
    # The history moves the routing: the same heads reading a zero history route differently.
    blind = fresh(tiny_ensemble, seed=4, router="aware")
    blind.new_history = lambda rows: _ZeroHistory(rows, 3)
    assert blind.generate(prompts, **gen) != ref


class _ZeroHistory(History):
    """A history that never records anything (for the test that the router's choices depend on it)."""

    def update(self, logp, valid=None):
        pass

    def replay(self, logp, valid):
        return logp.new_zeros(*logp.shape[:2], 2 * self.M)


def test_aware_router_reads_the_history(tiny_ensemble):
    """Same next-token statistics, different record on the text so far: the aware router's scores differ,
    the confidence router's do not."""
    ids, mask = batch(tiny_ensemble, PROMPTS)
    hidden, _, stats, _ = tiny_ensemble.member_features(ids, mask, ids.masked_fill(mask == 0, -100))
    other = stats.clone()
    other[..., : history_dim(3)] -= 1.0
    for router, moved in (("aware", True), ("confidence", False)):
        ens = fresh(tiny_ensemble, seed=1, router=router)
        assert (not torch.equal(ens.router_logits(hidden, stats), ens.router_logits(hidden, other))) == moved
