"""Routed generation: equivalences that pin the decoding loop down."""

from __future__ import annotations

import pytest
import torch

from salm.generation import GenerationError, parse_routing
from tests.conftest import PROMPTS, fresh


def _hf_greedy(member, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(member.device)
    out = member.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def _ids(ens, prompts, **kw):
    outs = ens.generate(prompts, temperature=0, return_outputs=True, **kw)
    return [o.token_ids for o in outs]


def test_batched_equals_unbatched(tiny_ensemble):
    batched = _ids(tiny_ensemble, PROMPTS, max_new_tokens=12)
    single = [_ids(tiny_ensemble, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == single
    assert len({len(tiny_ensemble.tokenizer(p)["input_ids"]) for p in PROMPTS}) == 3  # lengths really differ


def test_cached_equals_recomputed(tiny_ensemble):
    for routing in ("argmax", "mixture", "threshold:0.5"):
        cached = _ids(tiny_ensemble, PROMPTS, max_new_tokens=10, routing=routing)
        recomputed = _ids(tiny_ensemble, PROMPTS, max_new_tokens=10, routing=routing, use_cache=False)
        assert cached == recomputed, routing


@pytest.mark.parametrize("k", [0, 1, 2])
def test_member_routing_equals_members_own_generate(tiny_ensemble, k):
    mid = tiny_ensemble.model_ids[k]
    for prompt in PROMPTS:
        ours = _ids(tiny_ensemble, [prompt], max_new_tokens=10, routing=f"member:{mid}")[0]
        ref = _hf_greedy(tiny_ensemble.members[k], tiny_ensemble.tokenizer, prompt, 10)
        assert ours == ref[: len(ours)] and (len(ours) == len(ref) or ref[len(ours)] in tiny_ensemble.eos_token_ids)


@pytest.mark.parametrize("k", [0, 2])
def test_heads_forced_to_member_k_route_to_k(tiny_ensemble, k):
    ens = fresh(tiny_ensemble, seed=k)
    with torch.no_grad():
        ens.projection_heads[ens.model_ids[k]].non_linear_projection[-1].bias.fill_(100.0)
    outs = ens.generate(PROMPTS, max_new_tokens=8, temperature=0, return_outputs=True)
    for prompt, out in zip(PROMPTS, outs):
        assert {d.member for d in out.decisions} == {ens.model_ids[k]}
        ref = _hf_greedy(ens.members[k], ens.tokenizer, prompt, 8)
        assert out.token_ids == ref[: len(out.token_ids)]


def test_routing_really_differs_between_members(tiny_ensemble):
    """Guard for the tests above: forced routes must give different texts, or they prove nothing."""
    outs = {
        tuple(_ids(tiny_ensemble, [PROMPTS[0]], max_new_tokens=8, routing=f"member:{m}")[0])
        for m in tiny_ensemble.model_ids
    }
    assert len(outs) == 3


def test_threshold_routing(tiny_ensemble):
    ens = fresh(tiny_ensemble)
    with torch.no_grad():
        ens.projection_heads["tiny-2"].non_linear_projection[-1].bias.fill_(1.0)  # mild preference for tiny-2
    for p, expected in ((0.99, {"tiny-0"}), (0.05, {"tiny-2"})):
        out = ens.generate(PROMPTS[0], max_new_tokens=5, temperature=0, routing=f"threshold:{p}", return_outputs=True)
        assert {d.member for d in out.decisions} == expected


def test_decisions_and_stop_strings(tiny_ensemble):
    out = tiny_ensemble.generate(PROMPTS[1], max_new_tokens=15, temperature=0, return_decisions=True)
    assert len(out["decisions"]) == len(out["token_ids"])
    for d in out["decisions"]:
        assert set(d["routing_probs"]) == set(tiny_ensemble.model_ids)
        assert abs(sum(d["routing_probs"].values()) - 1) < 1e-5
        assert d["member"] == max(d["routing_probs"], key=d["routing_probs"].get)
    text = out["text"]
    stop = text[3:6]
    assert stop and stop in text
    cut = tiny_ensemble.generate(PROMPTS[1], max_new_tokens=15, temperature=0, stop=stop, return_outputs=True)
    assert cut.text == text[: text.find(stop)] and cut.stop_reason == "stop"


def test_sampling_is_seeded_and_streaming_matches(tiny_ensemble):
    a = tiny_ensemble.generate(PROMPTS, max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=5)
    b = tiny_ensemble.generate(PROMPTS, max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=5)
    assert a == b
    streamed = list(tiny_ensemble.stream(PROMPTS[2], max_new_tokens=10, temperature=0))
    full = tiny_ensemble.generate(PROMPTS[2], max_new_tokens=10, temperature=0, return_outputs=True)
    assert [d.token_id for d in streamed] == full.token_ids


def test_leaving_a_stream_early_cancels_its_worker(tiny_ensemble):
    import threading

    before = threading.active_count()
    it = tiny_ensemble.stream(PROMPTS[0], max_new_tokens=5000, temperature=0)
    first = [next(it), next(it)]
    it.close()  # what `break` does; must not leave a worker decoding 5000 tokens
    assert len(first) == 2 and threading.active_count() == before


def test_string_in_string_out(tiny_ensemble):
    assert isinstance(tiny_ensemble.generate(prompt=PROMPTS[0], max_new_tokens=3, temperature=0.3), str)
    assert len(tiny_ensemble.generate(PROMPTS, max_new_tokens=3, temperature=0.3, batch_size=2)) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": []}, "prompt list is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"temperature": -0.1}, r"temperature must be >= 0 \(0 = greedy\), got -0.1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"routing": "member:nobody"}, r"unknown member 'nobody'; members are \['tiny-0', 'tiny-1', 'tiny-2'\]"),
        ({"routing": "threshold:2"}, r"threshold must be a number in \(0, 1\)"),
        ({"routing": "vote"}, "unknown routing 'vote'"),
        ({"prompt": "word " * 300}, r"prompt 0 has \d+ tokens; member 'tiny-0' reads at most 256"),
    ],
)
def test_bad_input(tiny_ensemble, kwargs, message):
    kwargs = {"prompt": "hello", "max_new_tokens": 3, **kwargs}
    with pytest.raises(GenerationError, match=message):
        tiny_ensemble.generate(**kwargs)


def test_left_truncation_when_asked(tiny_ensemble):
    """The prompt's end is kept, leaving room for max_new_tokens: the same as generating from those ids."""
    from salm.generation import encode_prompts

    long = "word " * 300
    ctx = tiny_ensemble.context_length
    kept = encode_prompts(tiny_ensemble, [long], truncate="left", room=3)[0]
    assert kept == tiny_ensemble.tokenizer(long)["input_ids"][-(ctx - 3) :]
    out = tiny_ensemble.generate(long, max_new_tokens=3, temperature=0, truncate="left", return_outputs=True)
    assert out.stop_reason != "context" and (len(out.token_ids) == 3 or out.stop_reason == "eos")
    ref = _hf_greedy(tiny_ensemble.members[0], tiny_ensemble.tokenizer, tiny_ensemble.tokenizer.decode(kept), 3)
    forced = tiny_ensemble.generate(
        long, max_new_tokens=3, temperature=0, truncate="left", routing="member:tiny-0", return_outputs=True
    )
    assert forced.token_ids == ref[: len(forced.token_ids)]


def test_parse_routing_alias():
    """``member:<alias>`` resolves through the loaded members' aliases, not the default trio's."""
    from salm.members import MODELS, ModelInfo

    assert parse_routing("member:quen-25-15b-med", MODELS[:2]).member == 1
    assert parse_routing("member:qwen-25-15b-med", ["qwen-25-15b", "qwen-25-15b-med"]).member == 1
    own = [ModelInfo("a", "a", "a"), ModelInfo("b", "b", "b", aliases=("quen-25-15b-med",))]
    assert parse_routing("member:quen-25-15b-med", own).member == 1
    with pytest.raises(GenerationError, match=r"unknown member 'quen-25-15b-med'; members are \['x', 'y'\]"):
        parse_routing("member:quen-25-15b-med", ["x", "y"])


def test_decode_config_equals_keywords_and_keywords_override_it(tiny_ensemble):
    """``config=DecodeConfig(...)`` decodes exactly as the same settings given as keywords; a keyword given
    beside a config wins; the seed's positional form (prompt, max_new_tokens, temperature) still works."""
    from salm.generation import DecodeConfig

    prompts = ["The cat", "A much longer prompt about dogs"]
    kw = dict(max_new_tokens=5, temperature=0.8, top_k=20, seed=3, routing="mixture", stop=["zzz"])
    by_keywords = tiny_ensemble.generate(prompts, **kw, return_outputs=True)
    config = DecodeConfig(**kw)
    by_config = tiny_ensemble.generate(prompts, config=config, return_outputs=True)
    assert [o.token_ids for o in by_config] == [o.token_ids for o in by_keywords]
    assert [o.decisions for o in by_config] == [o.decisions for o in by_keywords]
    greedy = tiny_ensemble.generate(prompts[0], max_new_tokens=4, temperature=0)
    overridden = dict(max_new_tokens=4, temperature=0, routing="argmax", stop=None, seed=None)
    assert tiny_ensemble.generate(prompts[0], config=config, **overridden) == greedy
    assert tiny_ensemble.generate(prompts[0], 4, 0) == greedy  # positional, as the seed called it
    assert tiny_ensemble.generate(input_texts=prompts[0], max_new_tokens=4, temperature=0) == greedy
    streamed = [d.token_id for d in tiny_ensemble.stream(prompts[1], config=config)]
    assert streamed == tiny_ensemble.generate(prompts[1], **kw, return_outputs=True).token_ids
    assert config == DecodeConfig(**kw)  # generate never changes the caller's config


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(routing=None), "routing must be a string .*got NoneType"),
        (dict(cache_implementation="paged"), "cache_implementation must be 'dynamic' or 'static', got 'paged'"),
        (dict(truncate="right"), "truncate must be None or 'left', got 'right'"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    ],
)
def test_decode_config_validates_without_a_model_and_generate_rejects_it(tiny_ensemble, config, message):
    from salm.generation import DecodeConfig

    with pytest.raises(GenerationError, match=message):
        DecodeConfig(**config).validate()
    with pytest.raises(GenerationError, match=message):
        tiny_ensemble.generate("hello", config=DecodeConfig(**config))
