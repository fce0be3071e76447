"""``salm evaluate --num_fewshot``: where shots come from, that every model sees the same prompt, reproducibility."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from salm.data import Example
from salm.evaluation.runner import EvalSettings, evaluate, prepare_tasks
from salm.evaluation.tasks import TASKS, draw_shots, generic_task
from salm.generation import DecodeConfig
from tests.conftest import write_task_data


def _examples(n: int, split: str = "test") -> list[Example]:
    return [
        Example(f"arith/{split}/{i}", "arith", f"What is {i} plus 1?",
                f"Reasoning: {i}+1.\nTherefore, the answer is: {i + 1}", str(i + 1))
        for i in range(n)
    ]  # fmt: skip


def test_shots_are_seeded_per_example_and_never_the_example():
    exs = _examples(12)
    a = draw_shots("arith", exs, exs, 3, seed=7)
    assert a == draw_shots("arith", exs, exs, 3, seed=7)
    assert a != draw_shots("arith", exs, exs, 3, seed=8)
    assert all(ex.id not in {s.id for s in a[ex.id]} and len(a[ex.id]) == 3 for ex in exs)
    # An example's shots do not depend on which other examples are evaluated or in which order.
    assert draw_shots("arith", exs[::-1][:4], exs, 3, seed=7)[exs[-1].id] == a[exs[-1].id]
    with pytest.raises(ValueError, match="3 shots wanted but only 1 examples"):
        draw_shots("arith", exs[:1], exs[:2], 3, seed=7)


def test_local_file_shots_come_from_rows_not_evaluated(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in _examples(10)))
    settings = EvalSettings(sample_size=3, num_fewshot=2, random_seed=5)
    (task, examples), *_ = prepare_tasks(["arith"], settings, {"arith": str(path)})[0]
    evaluated = {ex.id for ex in examples}
    info = task.describe()["fewshot"]
    assert info["k"] == 2 and info["seed"] == 5 and "not evaluated" in info["source"]
    for ex in examples:
        shots = info["shots"][ex.id]
        assert len(shots) == 2 and not set(shots) & evaluated
        prompt = task.prompt(ex)
        assert prompt.endswith(ex.prompt) and prompt.count("Therefore, the answer is:") == 2
    (again, examples2), *_ = prepare_tasks(["arith"], settings, {"arith": str(path)})[0]
    assert [again.prompt(e) for e in examples2] == [task.prompt(e) for e in examples]
    too_many = EvalSettings(sample_size=9, num_fewshot=2)
    runs, skipped = prepare_tasks(["arith"], too_many, {"arith": str(path)})
    assert not runs and "--num_fewshot 2 needs that many shots but only 1" in skipped["arith"]


def test_known_dataset_shots_come_from_its_train_split(tmp_path, monkeypatch):
    monkeypatch.setenv("SALM_DATA_DIR", str(write_task_data(tmp_path / "data")))
    (task, examples), *_ = prepare_tasks(["gsm8k"], EvalSettings(sample_size=2, num_fewshot=3), None)[0]
    info = task.describe()["fewshot"]
    assert info["source"] == "train split of gsm8k"
    assert all(s.startswith("gsm8k/train/") for ex in examples for s in info["shots"][ex.id])
    assert task.prompt(examples[0]).count("Question:") == 4


def test_every_model_gets_the_same_fewshot_prompt_and_it_is_recorded(tiny_ensemble, tmp_path):
    task = generic_task("arith", scorer=TASKS.get("gsm8k").scorer)
    settings = EvalSettings(sample_size=2, num_fewshot=2, decode=DecodeConfig(max_new_tokens=4, temperature=0),
                            progress=False, plots=False, teacher_forced=False, batch_size=2, random_seed=3)  # fmt: skip
    pool = _examples(6)
    summary = evaluate(tiny_ensemble, [(task, pool)], tmp_path, settings)
    result = summary["datasets"]["arith"]
    assert result["settings"]["num_fewshot"] == 2 and result["task"]["fewshot"]["k"] == 2
    sampled = [ex for ex in pool if ex.id in result["example_ids"]]
    shots = draw_shots("arith", sampled, [ex for ex in pool if ex not in sampled], 2, seed=3)
    assert {k: [s.id for s in v] for k, v in shots.items()} == result["task"]["fewshot"]["shots"]
    prompts = ["".join(s.prompt + s.answer + "\n\n" for s in shots[ex.id]) + ex.prompt for ex in sampled]
    rows = [json.loads(line) for line in (tmp_path / "arith" / "predictions.jsonl").read_text().splitlines()]
    for name in ["ensemble", *tiny_ensemble.model_ids]:
        routing = "argmax" if name == "ensemble" else f"member:{name}"
        want = tiny_ensemble.generate(prompts, max_new_tokens=4, temperature=0, routing=routing,
                                      stop=list(task.stop), batch_size=2)  # fmt: skip
        assert [r["output"] for r in rows if r["model"] == name] == want
    zero = evaluate(tiny_ensemble, [(task, pool)], tmp_path / "zero", replace(settings, num_fewshot=0))
    assert zero["datasets"]["arith"]["task"]["fewshot"] is None


def test_prepared_tasks_keep_their_shots_through_evaluate(tiny_ensemble, tmp_path):
    """``salm evaluate`` prepares its tasks (shots included) before loading members, then hands them to
    ``evaluate``: the shots must survive (they were drawn again from an empty pool, so every dataset was skipped
    and the run exited 0 having evaluated nothing)."""
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in _examples(10)))
    settings = EvalSettings(sample_size=3, num_fewshot=2, random_seed=5, decode=DecodeConfig(max_new_tokens=3,
                            temperature=0), progress=False, plots=False, teacher_forced=False)  # fmt: skip
    runs, skipped = prepare_tasks(["arith"], settings, {"arith": str(path)})
    assert not skipped
    summary = evaluate(tiny_ensemble, runs, tmp_path / "out", settings)
    assert "arith" in summary["datasets"] and not summary.get("skipped")
    assert summary["datasets"]["arith"]["task"]["fewshot"] == runs[0][0].describe()["fewshot"]
