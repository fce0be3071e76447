"""Static caches and the compiled decode step emit exactly what the default (dynamic-cache) path emits."""

from __future__ import annotations

import logging
import re

import pytest
import torch

import salm.fast_decode as fast_decode
from salm.generation import GenerationError
from tests.conftest import PROMPTS, fresh

ROUTINGS = ["argmax", "mixture", "threshold:0.5", "member:tiny-0", "member:tiny-1"]  # tiny-1 is the Llama member


def _outs(ens, prompts, **kw):
    return [o.to_dict() for o in ens.generate(prompts, temperature=0, return_outputs=True, **kw)]


def _same(a, b):
    """Same tokens, texts and stop reasons; routing probabilities equal up to float rounding."""
    assert [(x["token_ids"], x["text"], x["stop_reason"]) for x in a] == [
        (y["token_ids"], y["text"], y["stop_reason"]) for y in b
    ]
    for x, y in zip(a, b):
        for dx, dy in zip(x["decisions"], y["decisions"]):
            assert dx["member"] == dy["member"]
            for m, p in dx["routing_probs"].items():
                assert abs(p - dy["routing_probs"][m]) < 1e-4


@pytest.mark.parametrize("routing", ROUTINGS)
def test_static_equals_dynamic(tiny_ensemble, routing):
    """Mixed-length (left-padded) batch and batch 1, every routing mode."""
    dynamic = _outs(tiny_ensemble, PROMPTS, max_new_tokens=10, routing=routing)
    static = _outs(tiny_ensemble, PROMPTS, max_new_tokens=10, routing=routing, cache_implementation="static")
    _same(static, dynamic)
    single = _outs(tiny_ensemble, PROMPTS[:1], max_new_tokens=10, routing=routing, cache_implementation="static")
    _same(single, dynamic[:1])


def test_static_stop_strings_and_eos_per_row(tiny_ensemble):
    """A stop string ends one row early while the others go on; EOS ends a row where the heads route to it."""
    ens = fresh(tiny_ensemble, seed=3)
    free = _outs(ens, PROMPTS, max_new_tokens=15)
    stop = free[1]["text"][2:5]
    assert stop and stop not in free[0]["text"]
    ens.eos_token_ids = set(ens.eos_token_ids) | {free[2]["token_ids"][4]}  # row 2 ends at its 5th token
    dynamic = _outs(ens, PROMPTS, max_new_tokens=15, stop=stop)
    static = _outs(ens, PROMPTS, max_new_tokens=15, stop=stop, cache_implementation="static")
    _same(static, dynamic)
    assert dynamic[1]["stop_reason"] == "stop" and dynamic[2]["stop_reason"] == "eos"
    assert len({len(x["token_ids"]) for x in dynamic}) > 1


def test_context_edge_never_overruns_the_cache(tiny_ensemble):
    """A prompt 3 tokens short of the context: 3 tokens, stop reason 'context', cache written to its last slot."""
    ens = fresh(tiny_ensemble)
    ctx = ens.context_length
    ids = ens.tokenizer("word " * 300)["input_ids"][-(ctx - 3) :]
    prompt = ens.tokenizer.decode(ids)
    assert len(ens.tokenizer(prompt)["input_ids"]) == ctx - 3
    dynamic = _outs(ens, [prompt, PROMPTS[1]], max_new_tokens=ctx)
    static = _outs(ens, [prompt, PROMPTS[1]], max_new_tokens=ctx, cache_implementation="static")
    _same(static, dynamic)
    assert [len(x["token_ids"]) for x in static] == [3, 3] and static[0]["stop_reason"] == "context"
    caches = fast_decode._state(ens)["caches"]
    assert caches and all(k[2] == ctx for k in caches)  # the cache length is capped at the context
    for cache in caches.values():
        for layer in cache.layers:
            assert int(layer.cumulative_length) == ctx - 3 + 2 <= layer.max_cache_len  # prompt + 2 fed tokens


def test_static_stepper_refuses_to_write_past_its_cache(tiny_ensemble):
    from salm.fast_decode import StaticStepper

    ids = torch.tensor([[5, 6, 7]])
    stepper = StaticStepper(tiny_ensemble, (0,), False, torch.ones_like(ids), steps=2, compile=False)
    stepper.length = 4  # as if the bucket were exactly prompt + 1 fed token
    stepper.prefill(ids)
    stepper.step(torch.tensor([8]))
    with pytest.raises(RuntimeError, match="static cache of 4 slots is full: cannot write 1 more after 4"):
        stepper.step(torch.tensor([9]))


def test_member_routing_runs_only_that_member(tiny_ensemble, monkeypatch):
    ens = fresh(tiny_ensemble)
    calls = []
    run_member = ens.run_member
    monkeypatch.setattr(ens, "run_member", lambda i, *a, **k: calls.append(i) or run_member(i, *a, **k))
    for impl in ("dynamic", "static"):
        calls.clear()
        out = ens.generate(
            PROMPTS[0], max_new_tokens=4, temperature=0, routing="member:tiny-2", cache_implementation=impl,
            return_outputs=True,
        )  # fmt: skip
        assert set(calls) == {2}
        assert all(d.routing_probs == {"tiny-0": 0.0, "tiny-1": 0.0, "tiny-2": 1.0} for d in out.decisions)


def _aot_eager(monkeypatch):
    """torch.compile through dynamo's tracing and AOT autograd but without inductor's slow C++ build."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "mode": None, "backend": "aot_eager"}))


@pytest.mark.parametrize("routing", ["argmax", "member:tiny-1"])
def test_captured_step_equals_dynamic(tiny_ensemble, monkeypatch, routing):
    """The whole step traced as one graph; batch 3 runs in the batch-4 bucket (a dummy row) and batch 1 alone."""
    _aot_eager(monkeypatch)
    ens = fresh(tiny_ensemble)
    dynamic = _outs(ens, PROMPTS, max_new_tokens=8, routing=routing)
    _same(_outs(ens, PROMPTS, max_new_tokens=8, routing=routing, compile=True), dynamic)
    _same(_outs(ens, PROMPTS[:1], max_new_tokens=8, routing=routing, compile=True), dynamic[:1])
    report = fast_decode.warmup_report(ens)
    assert [(w.batch, w.cache_len) for w in report] == [(4, 64), (1, 64)]  # prompts + 8 tokens fit 64 slots


def test_compile_failure_falls_back_with_a_message(tiny_ensemble, monkeypatch, caplog):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    ens = fresh(tiny_ensemble)
    with caplog.at_level(logging.WARNING, logger="salm.fast_decode"):
        compiled = _outs(ens, PROMPTS, max_new_tokens=6, compile=True)
        again = _outs(ens, PROMPTS, max_new_tokens=6, compile=True)
    _same(compiled, _outs(ens, PROMPTS, max_new_tokens=6))
    _same(again, compiled)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "torch.compile failed (RuntimeError: no C++ compiler): decoding with static caches, uncompiled"
    ]  # said once, not at every batch


def test_compile_unavailable_falls_back_with_a_message(tiny_ensemble, monkeypatch, caplog):
    monkeypatch.setattr(fast_decode, "compile_available", lambda: "torch 1.x has no torch.compile")
    ens = fresh(tiny_ensemble)
    with caplog.at_level(logging.WARNING, logger="salm.fast_decode"):
        _same(_outs(ens, PROMPTS, max_new_tokens=5, compile=True), _outs(ens, PROMPTS, max_new_tokens=5))
    assert "torch.compile unavailable (torch 1.x has no torch.compile)" in caplog.text


def test_bad_cache_implementation(tiny_ensemble):
    with pytest.raises(GenerationError, match="cache_implementation must be 'dynamic' or 'static', got 'paged'"):
        tiny_ensemble.generate("hi", max_new_tokens=2, cache_implementation="paged")


@pytest.mark.slow
def test_inductor_compiled_step_equals_dynamic(tiny_ensemble):
    """The real compiler (inductor; tens of seconds on 2 CPU cores): one member, batch 1."""
    ens = fresh(tiny_ensemble)
    kw = dict(max_new_tokens=6, routing="member:tiny-0")
    _same(_outs(ens, PROMPTS[:1], compile=True, **kw), _outs(ens, PROMPTS[:1], **kw))
    assert [(w.members, w.batch) for w in fast_decode.warmup_report(ens)] == [(("tiny-0",), 1)]


def test_compile_flag_of_generate_and_evaluate(tiny_infos, tmp_path, monkeypatch, capsys):
    """``--compile`` reaches generation: same answers as without it, and the warm-ups are reported."""
    import json

    from salm.cli import main
    from salm.testing import write_member_set
    from tests.conftest import math_examples

    _aot_eager(monkeypatch)
    members = str(write_member_set(tmp_path / "members.json", tiny_infos))
    common = ["--models", members, "--device", "cpu", "--temperature", "0"]
    answers = []
    for extra in ([], ["--compile"]):
        torch.manual_seed(0)  # the same untrained heads in both runs
        assert main(["generate", *common, "--max_new_tokens", "6", *extra, "What is 2 + 3?"]) == 0
        captured = capsys.readouterr()
        answers.append(captured.out)
    assert answers[0] == answers[1] and answers[0].strip()
    assert "compiled the decode step of tiny-0, tiny-1, tiny-2 (batch 1, cache 32) in" in captured.err

    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in math_examples(3)))
    outputs = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"out{len(extra)}"
        argv = ["evaluate", *common, "--datasets", "arith", "--data", f"arith={data}", "--max_new_tokens", "4",
                "--only_ensemble", "--no_plots", "--no_teacher_forced", "--output_dir", str(out), *extra]  # fmt: skip
        torch.manual_seed(0)
        assert main(argv) == 0
        summary = json.loads((out / "evaluation_summary.json").read_text())
        assert summary["settings"]["compile"] is bool(extra)
        rows = (out / "arith" / "predictions.jsonl").read_text().splitlines()
        outputs.append(sorted((r["model"], r["output"]) for r in map(json.loads, rows)))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3
    assert re.search(r"\(batch 4, cache (32|64)\)", capsys.readouterr().err)  # 3 prompts in the batch-4 bucket


def test_cache_lengths_are_few_and_close_to_what_is_needed():
    """Powers of two from 32 to 256, then multiples of 256; never beyond the context, never below the need."""
    lengths = [fast_decode.cache_length(n, None) for n in (1, 25, 32, 33, 200, 256, 257, 600, 1025)]
    assert lengths == [32, 32, 32, 64, 256, 256, 512, 768, 1280]
    assert fast_decode.cache_length(600, 700) == 700 and fast_decode.cache_length(5, 16) == 16


def test_finished_rows_leave_the_compiled_batch(tiny_ensemble, monkeypatch):
    """Once the live rows fit a smaller batch bucket they move there (cache rows copied): same tokens."""
    _aot_eager(monkeypatch)
    ens = fresh(tiny_ensemble, seed=4)
    free = _outs(ens, PROMPTS, max_new_tokens=12)
    early = next(t for t in free[1]["token_ids"][1:4] if t not in free[0]["token_ids"])
    ens.eos_token_ids = set(ens.eos_token_ids) | {early}  # row 1 ends within 4 tokens, row 0 runs on
    dynamic = _outs(ens, PROMPTS, max_new_tokens=12)
    _same(_outs(ens, PROMPTS, max_new_tokens=12, compile=True), dynamic)
    assert dynamic[1]["stop_reason"] == "eos" and len(dynamic[0]["token_ids"]) == 12
    buckets = [w.batch for w in fast_decode.warmup_report(ens)]
    assert buckets[0] == 4 and min(buckets) < 4


def test_interleaved_static_decodings_never_share_caches(tiny_ensemble):
    """Two decodings of one ensemble in the same shape bucket at once (a server's threads): each its own caches."""
    from salm.generation import _left_pad, decode_steps, encode_prompts, parse_routing

    ens = fresh(tiny_ensemble)
    ids, mask = _left_pad(encode_prompts(ens, PROMPTS), ens.tokenizer.pad_token_id)
    rt = parse_routing("argmax", ens.model_ids)
    ref = [t.tolist() for t, _, _ in decode_steps(ens, ids, mask, 6, rt)]
    first = decode_steps(ens, ids, mask, 6, rt, cache_implementation="static")
    second = decode_steps(ens, ids, mask, 6, rt, cache_implementation="static")
    pairs = [(a[0].tolist(), b[0].tolist()) for a, b in zip(first, second)]  # steps alternate between the two
    assert [a for a, _ in pairs] == ref and [b for _, b in pairs] == ref
    assert not fast_decode._state(ens)["in_use"]  # both gave their caches back
