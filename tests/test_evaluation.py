"""Evaluation: the runner end to end, fairness of member-vs-ensemble, and the analysis maths on known cases."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from salm.data import DatasetUnavailableError, Example
from salm.evaluation import inputs, runner
from salm.evaluation.analysis import (
    combine_teacher_forced,
    decision_patterns,
    kept_decisions,
    score_continuations,
    summarize_sums,
    token_scores,
)
from salm.evaluation.runner import ENSEMBLE, EvalSettings, evaluate, evaluate_task, sample_examples
from salm.evaluation.tasks import TASKS, Task, TaskRegistry, generic_task, score_auto, score_gsm8k_output
from salm.generation import DecodeConfig, GenerationOutput, TokenDecision
from salm.testing import write_member_set
from tests.conftest import fresh, math_examples


def _cli(argv: list[str]) -> int:
    import salm.cli

    return salm.cli.main(argv)


QUIET = dict(progress=False, plots=False)

# ----------------------------------------------------------------------------------------------------
# Pure maths
# ----------------------------------------------------------------------------------------------------


def test_decision_patterns_on_a_fixed_sequence():
    stats = decision_patterns([list("aabbba"), ["b"]], ["a", "b", "c"])
    assert stats["tokens"] == 7 and stats["sequences"] == 2
    assert stats["switches"] == 2  # a->b, b->a; the second generation's start is not a switch
    assert stats["switches_per_100_tokens"] == pytest.approx(200 / 7)
    assert stats["share"] == pytest.approx({"a": 3 / 7, "b": 4 / 7, "c": 0.0})
    runs = stats["run_length"]
    assert runs["histogram"] == {"1": 2, "2": 1, "3": 1}
    assert runs["mean"] == pytest.approx(7 / 4) and runs["max"] == 3 and runs["median"] == 1.5
    assert runs["mean_by_member"] == pytest.approx({"a": 1.5, "b": 2.0, "c": 0.0})
    empty = decision_patterns([], ["a"])
    assert empty["tokens"] == 0 and empty["switches_per_100_tokens"] == 0.0


def _known_case():
    """Two members, one row, two answer positions and one masked position; every number by hand."""
    gold = torch.log(torch.tensor([[[0.5, 0.25], [0.1, 0.4], [0.9, 0.9]]]))
    router = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 0.0]]])  # pi = (.5,.5), (.25,.75)
    mask = torch.tensor([[True, True, False]])
    return gold, router, mask


def test_teacher_forced_metrics_on_a_known_case():
    gold, router, mask = _known_case()
    scores = token_scores(gold, router, mask)
    sums = {
        "member_nll": {"m0": -float(scores["member"][0, 0]), "m1": -float(scores["member"][0, 1])},
        "ensemble_nll": -float(scores["mixture"].sum()),
        "routed_nll": -float(scores["routed"].sum()),
        "oracle_nll": -float(scores["oracle"].sum()),
        "agreement": int(scores["agreement"].sum()),
        "routed_to": {"m0": int(scores["routed_to"][0, 0]), "m1": int(scores["routed_to"][0, 1])},
        "router_prob": {"m0": float(scores["router_prob"][0, 0]), "m1": float(scores["router_prob"][0, 1])},
        "tokens": int(scores["tokens"].sum()),
        "sequences": 1,
    }
    m = summarize_sums(sums)
    assert m["tokens"] == 2
    assert m["member_nll"] == pytest.approx({"m0": math.log(20) / 2, "m1": math.log(10) / 2})
    assert m["best_member"] == "m1" and m["best_member_nll"] == pytest.approx(math.log(10) / 2)
    ens = -(math.log(0.5 * 0.5 + 0.5 * 0.25) + math.log(0.25 * 0.1 + 0.75 * 0.4)) / 2
    oracle = -(math.log(0.5) + math.log(0.4)) / 2
    assert m["ensemble_nll"] == pytest.approx(ens)
    assert m["oracle_nll"] == pytest.approx(oracle)
    # argmax routing: a tie at position 0 goes to member 0 (p=.5), position 1 to member 1 (p=.4) = the oracle.
    assert m["routed_nll"] == pytest.approx(oracle)
    assert m["router_agreement"] == 1.0
    assert m["router_share"] == pytest.approx({"m0": 0.5, "m1": 0.5})
    assert m["router_prob_mean"] == pytest.approx({"m0": (0.5 + 0.25) / 2, "m1": (0.5 + 0.75) / 2})
    assert m["captured_share"] == pytest.approx((math.log(10) / 2 - ens) / (math.log(10) / 2 - oracle))
    # Pooling two halves through their sums gives the whole.
    assert combine_teacher_forced([m, m])["ensemble_nll"] == pytest.approx(ens)
    assert combine_teacher_forced([m, m])["tokens"] == 4
    assert combine_teacher_forced([m, m])["router_share"] == pytest.approx(m["router_share"])


def test_captured_share_undefined_when_oracle_gains_nothing():
    gold = torch.log(torch.tensor([[[0.5, 0.25], [0.4, 0.1]]]))  # member 0 best on every token
    scores = token_scores(gold, torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.bool))
    sums = {
        "member_nll": {"a": -float(scores["member"][0, 0]), "b": -float(scores["member"][0, 1])},
        "ensemble_nll": -float(scores["mixture"].sum()),
        "routed_nll": 0.0,
        "oracle_nll": -float(scores["oracle"].sum()),
        "agreement": 0,
        "routed_to": {"a": 0, "b": 0},
        "router_prob": {"a": 0.0, "b": 0.0},
        "tokens": 2,
        "sequences": 1,
    }
    assert summarize_sums(sums)["captured_share"] is None


def test_kept_decisions_drop_the_overrun_stop_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("Reasoning: 2 + 3 = 5.\nQuestion: what")["input_ids"]
    text = "Reasoning: 2 + 3 = 5."
    decisions = [TokenDecision(tiny_tokenizer.decode([t]), t, "a", {"a": 1.0}) for t in ids]
    kept = kept_decisions(GenerationOutput(text, ids, decisions, "stop"), tiny_tokenizer)
    assert tiny_tokenizer.decode([d.token_id for d in kept]) == text
    assert kept_decisions(GenerationOutput(text, ids, decisions, "length"), tiny_tokenizer) == decisions


# ----------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------


def test_task_registry_and_generic_scoring():
    assert {"gsm8k", "medqa", "boolq"} <= set(TASKS.names())
    reg = TaskRegistry()
    reg.register(Task("arith", scorer=score_gsm8k_output))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Task("arith"))
    reg.register(Task("arith", scorer=None), replace=True)
    assert not reg.get("arith").generative
    with pytest.raises(KeyError, match="registered tasks: arith"):
        reg.get("nope")
    ex = math_examples(2)[1]  # label "3"
    assert score_auto("so the answer is 3.0", ex)["correct"]
    mc = Example("x/0", "x", "q", "Therefore, the answer is: B", "B", options={"A": "a", "B": "b"})
    assert score_auto("The answer is (B).", mc)["correct"]
    free = Example("y/0", "y", "q", "Therefore, the answer is: Paris", "Paris")
    assert score_auto("I think the answer is: paris", free)["correct"]
    assert generic_task("new").scorer is score_auto


def test_sampling_is_seeded_and_shared():
    exs = math_examples(20)
    a, b = sample_examples(exs, 5, 42), sample_examples(exs, 5, 42)
    assert a == b and len(a) == 5 and a != sample_examples(exs, 5, 7)
    assert sample_examples(exs, 0, 42) == exs and sample_examples(exs, 50, 42) == exs


# ----------------------------------------------------------------------------------------------------
# With models
# ----------------------------------------------------------------------------------------------------


def _direct_logprob(member, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(member(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_loglik_multiple_choice_picks_the_members_most_likely_option(tiny_ensemble, tmp_path):
    options = {"A": "fever and cough", "B": "def add(a, b)", "C": "the lazy dog", "D": "12 apples"}
    examples = [
        Example(
            f"mc/test/{i}",
            "mc",
            f"Pick one ({i}).\n" + "\n".join(f"{k}. {v}" for k, v in options.items()),
            "Therefore, the answer is: A",
            "A",
            options=options,
        )
        for i in range(2)
    ]
    task = Task("mc", scorer=None, loglik=dict(TASKS.get("medqa").loglik))
    settings = EvalSettings(choice_mode="loglik", teacher_forced=False, batch_size=3, **QUIET)
    result, _ = evaluate_task(tiny_ensemble, task, examples, settings, tmp_path / "mc")
    rows = [json.loads(line) for line in (tmp_path / "mc" / "predictions.jsonl").read_text().splitlines()]
    checked = 0
    for k, mid in enumerate(tiny_ensemble.model_ids):
        for ex in examples:
            for variant, build in task.loglik.items():
                direct = {
                    label: _direct_logprob(tiny_ensemble.members[k], tiny_ensemble.tokenizer, ex.prompt, cont)
                    for label, cont in build(ex)
                }
                row = next(r for r in rows if r["model"] == mid and r["id"] == ex.id and r["variant"] == variant)
                assert row["logprobs"] == pytest.approx(direct, abs=1e-3)
                assert row["answer"] == max(direct, key=direct.get)
                checked += 1
    assert checked == 3 * 2 * 2
    assert set(result["models"]) == {ENSEMBLE, *tiny_ensemble.model_ids}
    assert result["models"][ENSEMBLE]["primary"] == "loglik/letter"


def test_ensemble_loglik_is_the_router_mixture(tiny_ensemble):
    pairs = [("Question: what is two plus three?\nAnswer:\n", "Reasoning: 2 + 3 = 5.")]
    scores = score_continuations(tiny_ensemble, pairs, batch_size=1)
    ctx = tiny_ensemble.tokenizer(pairs[0][0])["input_ids"]
    cont = tiny_ensemble.tokenizer(pairs[0][1], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    labels = torch.full_like(ids, -100)
    labels[0, len(ctx) :] = torch.tensor(cont)
    with torch.no_grad():
        out = tiny_ensemble(ids, labels=labels)
    mix = torch.logsumexp(torch.log_softmax(out.router_logits, -1) + out.gold_logprobs, -1)[out.loss_mask].sum()
    assert float(scores.mixture[0]) == pytest.approx(float(mix), abs=1e-4)
    assert int(scores.tokens[0]) == len(cont)


@pytest.mark.parametrize("k", [0, 2])
def test_heads_forced_to_member_k_give_member_ks_predictions(tiny_ensemble, tmp_path, k):
    ens = fresh(tiny_ensemble, seed=10 + k)
    with torch.no_grad():
        ens.projection_heads[ens.model_ids[k]].non_linear_projection[-1].bias.fill_(100.0)
    arith = Task("arith", scorer=score_gsm8k_output)
    prose = Task("prose", scorer=None)  # NLL only: no generation
    settings = EvalSettings(decode=DecodeConfig(max_new_tokens=6, temperature=0.7), batch_size=2, **QUIET)
    summary = evaluate(ens, [(arith, math_examples(3)), (prose, math_examples(2))], tmp_path, settings)
    rows = [json.loads(line) for line in (tmp_path / "arith" / "predictions.jsonl").read_text().splitlines()]
    ours = {r["id"]: r["output"] for r in rows if r["model"] == ENSEMBLE}
    member = {r["id"]: r["output"] for r in rows if r["model"] == ens.model_ids[k]}
    assert ours == member and len(ours) == 3
    assert summary["datasets"]["arith"]["decision_patterns"]["share"][ens.model_ids[k]] == 1.0
    prose_res = summary["datasets"]["prose"]
    assert all(not e for e in prose_res["models"].values()) and prose_res["teacher_forced"]["tokens"] > 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "evaluation_summary.json").is_file()


def test_rerun_resumes_from_finished_generations(tiny_ensemble, tmp_path, monkeypatch):
    ens = fresh(tiny_ensemble, seed=3)
    arith = Task("arith", scorer=score_gsm8k_output)
    settings = EvalSettings(
        decode=DecodeConfig(max_new_tokens=5, temperature=0), batch_size=2, teacher_forced=False, **QUIET
    )
    first = evaluate(ens, [(arith, math_examples(3))], tmp_path, settings)
    stored = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "arith" / runner.GENERATIONS_DIR).iterdir())
    assert stored == sorted([ENSEMBLE, *ens.model_ids])

    calls = []
    real = ens.generate
    monkeypatch.setattr(ens, "generate", lambda *a, **kw: calls.append(kw["config"].routing) or real(*a, **kw))
    second = evaluate(ens, [(arith, math_examples(3))], tmp_path, settings)
    assert calls == []  # everything was finished: nothing is generated again
    assert second["datasets"]["arith"]["models"] == first["datasets"]["arith"]["models"]

    # A model whose stored file is gone (the run was killed during it) is generated again, and only it.
    next((tmp_path / "arith" / runner.GENERATIONS_DIR).glob(f"{ens.model_ids[1]}-*")).unlink()
    evaluate(ens, [(arith, math_examples(3))], tmp_path, settings)
    assert calls == [f"member:{ens.model_ids[1]}"]

    # Other decoding settings or other heads are other generations.
    calls.clear()
    fewer_tokens = replace(settings, decode=replace(settings.decode, max_new_tokens=4))
    evaluate(ens, [(arith, math_examples(3))], tmp_path, fewer_tokens)
    assert len(calls) == 1 + len(ens.model_ids)
    calls.clear()
    with torch.no_grad():
        next(iter(ens.parameters())).add_(1.0)
    evaluate(ens, [(arith, math_examples(3))], tmp_path, settings)
    assert len(calls) == 1 + len(ens.model_ids)


def test_unreachable_hub_names_the_flag(tiny_infos, tmp_path, monkeypatch, capsys):
    def offline(source, split=None, name=None, **_):
        raise DatasetUnavailableError(f"could not load {source!r} from the hub")

    monkeypatch.setattr(inputs, "load_examples", offline)
    members = write_member_set(tmp_path / "members.json", tiny_infos)
    rc = _cli(
        [
            "evaluate",
            "--models",
            str(members),
            "--datasets",
            "gsm8k",
            "--device",
            "cpu",
            "--output_dir",
            str(tmp_path / "out"),
        ],
    )
    err = capsys.readouterr().err
    assert rc == 2  # bad input: the same exit code as every other command's
    assert "gsm8k: the hub is unreachable; pass --data gsm8k=/path/to/gsm8k/test.jsonl" in err
    assert not (tmp_path / "out").exists()  # nothing ran, no members were loaded


def test_skipped_dataset_does_not_stop_the_others(tiny_infos, tmp_path, monkeypatch, capsys):
    real = inputs.load_examples

    def hub_down(source, split=None, name=None, **kw):
        if not Path(source).is_file():
            raise DatasetUnavailableError("offline")
        return real(source, split=split, name=name, **kw)

    monkeypatch.setattr(inputs, "load_examples", hub_down)
    data = tmp_path / "arith.jsonl"
    data.write_text(
        "".join(json.dumps({"question": ex.question, "answer": ex.answer}) + "\n" for ex in math_examples(3))
    )
    out = tmp_path / "out"
    rc = _cli(
        [
            "evaluate",
            "--models",
            str(write_member_set(tmp_path / "members.json", tiny_infos)),
            "--datasets",
            "medqa",
            "arith",
            "--data",
            f"arith={data}",
            "--max_new_tokens",
            "3",
            "--no_plots",
            "--only_ensemble",
            "--no_teacher_forced",
            "--device",
            "cpu",
            "--output_dir",
            str(out),
        ],
    )
    assert rc == 0
    assert (
        "medqa: the hub is unreachable; pass --data medqa=/path/to/medqa/test_4options.jsonl" in capsys.readouterr().err
    )
    summary = json.loads((out / runner.SUMMARY_NAME).read_text())
    assert list(summary["datasets"]) == ["arith"] and "medqa" in summary["skipped"]
    assert summary["datasets"]["arith"]["task"]["scorer"] == "score_auto"
    assert set(summary["datasets"]["arith"]["models"]) == {ENSEMBLE}


def test_end_to_end_cli_on_public_data(tiny_infos, shared_data, tmp_path):
    out = tmp_path / "results"
    argv = [
        "evaluate",
        "--models",
        str(write_member_set(tmp_path / "members.json", tiny_infos)),
        "--device",
        "cpu",
        "--sample_size",
        "3",
        "--max_new_tokens",
        "8",
        "--save_examples",
        "--num_examples",
        "2",
        "--output_dir",
        str(out),
        "--batch_size",
        "4",
        "--data",
        f"gsm8k={shared_data / 'gsm8k/test.jsonl'}",
        "--data",
        f"medqa={shared_data / 'medqa/test_4options.jsonl'}",
        "--data",
        f"boolq={shared_data / 'boolq/validation.jsonl'}",
    ]
    assert _cli(argv) == 0
    models = {ENSEMBLE, *(i.id for i in tiny_infos)}
    summary = json.loads((out / "evaluation_summary.json").read_text())
    assert set(summary["datasets"]) == {"gsm8k", "medqa", "boolq"} and not summary["skipped"]
    assert summary["settings"]["temperature"] == 0.3 and summary["settings"]["max_new_tokens"] == 8
    assert summary["settings"]["heads"].startswith("untrained")
    for name in ("gsm8k", "medqa", "boolq"):
        res = json.loads((out / name / "results.json").read_text())
        assert res["n"] == 3 and set(res["models"]) == models
        for entry in res["models"].values():
            assert entry["n"] == 3 and 0 <= entry["ci_low"] <= entry["accuracy"] <= entry["ci_high"] <= 1
            assert 0 <= entry["detection_rate"] <= 1
        assert res["settings"]["members"] == [i.id for i in tiny_infos]
        assert sum(res["decision_patterns"]["share"].values()) == pytest.approx(1.0)
        assert res["teacher_forced"]["tokens"] > 0 and set(res["teacher_forced"]["member_nll"]) == models - {ENSEMBLE}
        rows = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        gen = [r for r in rows if r["mode"] == "generative"]
        assert len(gen) == 3 * len(models) and {r["model"] for r in gen} == models
        assert all({"id", "output", "answer", "gold", "correct", "tokens_per_member"} <= set(r) for r in gen)
    medqa = json.loads((out / "medqa" / "results.json").read_text())
    assert set(medqa["models"][ENSEMBLE]["loglik"]) == {"letter", "answer"}
    improvement = json.loads((out / "gsm8k" / "results.json").read_text())["improvement_over_best"]["generative"]
    assert improvement["best_member"] in models and "delta" in improvement
    for f in ("report.md", "examples.html", "accuracy.png", "routing_share.png", "nll.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    page = (out / "examples.html").read_text()
    assert page.count("<h2>") == 3 * 2 and 'class="key"' in page and "title=" in page
    assert "accuracy.png" in (out / "report.md").read_text()


def test_examples_page_escapes_text_and_colours_members(tmp_path):
    from salm.display import member_colour
    from salm.evaluation.reports import write_examples_html

    items = [
        {
            "dataset": "d",
            "id": "d/0",
            "question": "<script>x</script>",
            "gold": "1",
            "answer": None,
            "correct": False,
            "tokens": [("<b>&", "a", {"a": 0.9, "b": 0.1}), ("\x06\n", "b", {"a": 0.2, "b": 0.8})],
        }
    ]
    page = write_examples_html(items, ["a", "b"], tmp_path / "e.html").read_text()
    assert "<script>" not in page and "&lt;b&gt;&amp;" in page and "\x06" not in page and "\u2406" in page
    assert member_colour(["a", "b"], "b") in page and 'title="a\na: 0.900\nb: 0.100"' in page


def test_cut_prompts_are_counted_as_generation_cuts_them(tiny_ensemble):
    from salm.generation import encode_prompts

    tok, ctx = tiny_ensemble.tokenizer, tiny_ensemble.context_length
    prompts = ["word " * 300, "hello", "word " * (ctx - 40)]  # too long; short; fits alone but not with 64 new
    kept = encode_prompts(tiny_ensemble, prompts, truncate="left", room=64)
    assert [len(k) for k in kept] == [ctx - 64, len(tok("hello")["input_ids"]), ctx - 64]
    assert runner.count_cut_prompts(tok, prompts, ctx, 64) == 2
    assert runner.count_cut_prompts(tok, prompts, None, 64) == 0
