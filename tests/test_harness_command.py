"""``salm harness``: every model in one call, the comparison table, resuming, and 2 processes = 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'salm[harness]')")

from salm.testing import write_member_set  # noqa: E402
from tests.conftest import write_jsonl, write_task_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_infos):
    """Two tiny members, saved (untrained but fixed) heads and tiny task data."""
    from salm.ensemble import MultiModelWithScalarHeads

    root = tmp_path_factory.mktemp("harness")
    members = write_member_set(root / "members.json", tiny_infos[:2])
    heads = MultiModelWithScalarHeads(tiny_infos[:2], device="cpu").save_pretrained(root / "heads")
    data = write_task_data(root / "data")
    return root, members, heads, data


def _argv(setup, out: Path, *extra: str) -> list[str]:
    _, members, heads, data = setup
    return ["harness", "--models", str(members), "--weights", str(heads), "--data_dir", str(data),
            "--output_dir", str(out), "--device", "cpu", "--batch_size", "2", "--max_gen_toks", "10",
            "--no_plots", *extra]  # fmt: skip


def _samples(folder: Path, task: str) -> list[dict]:
    rows = [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["doc_id"], r["filter"]))


def test_every_model_in_one_call_with_a_comparison_table(setup, capsys):
    from salm.cli import main

    out = setup[0] / "run"
    argv = _argv(setup, out, "--tasks", "gsm8k,medqa_4options", "--num_fewshot", "2", "--limit", "3")
    assert main(argv) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["tasks"] == {"gsm8k": "gsm8k_local", "medqa_4options": "medqa_4options_local"}
    assert list(summary["models"]) == ["ensemble", "tiny-0", "tiny-1"]
    for requested, task in summary["tasks"].items():
        row = summary["comparison"][requested]
        values = {}
        for name in summary["models"]:
            res = json.loads((out / name / "results.json").read_text())  # lm-eval's own results file
            values[name] = res["results"][task][row["metric"]]
            assert row["models"][name]["value"] == values[name] and row["models"][name]["n"] == 3
        best = max(v for k, v in values.items() if k != "ensemble")
        assert row["ensemble_minus_best"]["delta"] == pytest.approx(values["ensemble"] - best)
        # The few-shot prompts are the same for every model (lm-eval's fewshot seed is fixed per model run).
        prompts = {n: [s["arguments"] for s in _samples(out / n, task)] for n in summary["models"]}
        assert prompts["ensemble"] == prompts["tiny-0"] == prompts["tiny-1"]
    assert prompts["ensemble"][0][0][0].count("Question: ") == 3  # two shots and the question
    table = (out / "comparison.md").read_text()
    assert "| gsm8k (gsm8k_local, exact_match,strict-match) | 3 |" in table
    capsys.readouterr()
    assert main(argv) == 0  # same settings: every model is reused, nothing re-evaluated
    assert capsys.readouterr().err.count("reusing") == 3


def test_another_dtype_is_evaluated_again_and_recorded(setup, capsys):
    """The dtype is in the resume key: a bf16 run into a folder of fp32 results reruns every model."""
    from salm.cli import main

    out = setup[0] / "dtypes"
    for dtype in ("float32", "bfloat16"):
        assert main(_argv(setup, out, "--tasks", "medqa_4options", "--limit", "2", "--dtype", dtype)) == 0
        assert "reusing" not in capsys.readouterr().err
        summary = json.loads((out / "comparison.json").read_text())
        assert summary["settings"]["dtype"] == summary["compute"]["dtype"] == dtype


def test_bad_input_is_named(setup, capsys):
    from salm.cli import main

    assert main(_argv(setup, setup[0] / "bad", "--routing", "member:tiny-0")) == 2
    assert "--routing is the ensemble's" in capsys.readouterr().err
    assert main(_argv(setup, setup[0] / "bad", "--tasks", " , ")) == 2
    assert "--tasks is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_equal_one(setup):
    """``accelerate launch`` with 2 CPU processes (gloo): lm-eval shards the documents by rank; the gathered
    scores equal a single process's (zero-shot: lm-eval draws shots per rank, so shots differ across layouts)."""
    from salm.cli import main

    root = setup[0]
    common = ("--tasks", "medqa_4options,gsm8k", "--num_fewshot", "0", "--limit", "5", "--only_ensemble")
    one, two = root / "one", root / "two"
    assert main(_argv(setup, one, *common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(root / "hf_home"), "SALM_CACHE": str(root / "cache")}  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    cmd = [*launch, "-m", "salm.cli", *_argv(setup, two, *common)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "ensemble" / "results.json").read_text())
    b = json.loads((two / "ensemble" / "results.json").read_text())
    for task in ("medqa_4options_local", "gsm8k_local"):
        assert a["results"][task] == pytest.approx(b["results"][task], abs=1e-9)
        sa, sb = _samples(one / "ensemble", task), _samples(two / "ensemble", task)
        assert [s["doc_id"] for s in sa] == [s["doc_id"] for s in sb] == sorted(s["doc_id"] for s in sa)
        assert [s["arguments"] for s in sa] == [s["arguments"] for s in sb]
        if task == "gsm8k_local":
            assert [s["resps"] for s in sa] == [s["resps"] for s in sb]
        else:
            la = [r[0][0] for s in sa for r in s["resps"]]
            lb = [r[0][0] for s in sb for r in s["resps"]]
            assert la == pytest.approx(lb, abs=1e-5)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("salm harness: error: ")
    return err[0].removeprefix("salm harness: error: ")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),  # ran with 8 and recorded 0
        (["--max_gen_toks", "0"], "--max_gen_toks must be an integer >= 1, got 0"),
        (["--limit", "0"], "--limit must be a number of documents >= 1 or a fraction in (0, 1), got 0.0"),
        (["--limit", "-1"], "--limit must be a number of documents >= 1 or a fraction in (0, 1), got -1.0"),
        (["--limit", "2.5"], "--limit 2.5: a number of documents must be whole (a fraction must be < 1)"),
        (["--routing", "vote"], "--routing: unknown routing 'vote'"),
        (["--tasks", "gsm8k_lokal"], "--tasks gsm8k_lokal: unknown lm-eval task (did you mean gsm8k_local"),
        (
            ["--tasks", "quickstart_arithmetic"],
            "--tasks quickstart_arithmetic: no local copy in {empty} (it needs "
            "data/math_train.jsonl, data/math_test.jsonl there); pass --data_dir DIR",
        ),  # fmt: skip
        # HF_HUB_OFFLINE=1 (the suite's setting): lm-eval's hub task cannot be the fallback
        (
            ["--tasks", "gsm8k"],
            "--tasks gsm8k: no local copy in {empty} (it needs gsm8k/train.jsonl, "
            "gsm8k/test.jsonl there); pass --data_dir DIR (or set SALM_DATA_DIR=DIR) holding them, or run where",
        ),  # fmt: skip
    ],
)
def test_bad_input_is_one_line_before_the_members_load(setup, tmp_path, capsys, flags, message):
    from salm.cli import main

    root, _, heads, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    data = empty if "--tasks" in flags else setup[3]
    missing = tmp_path / "none.json"  # loading these members would fail: each error must come first
    argv = ["harness", "--models", str(missing), "--weights", str(heads), "--data_dir", str(data),
            "--output_dir", str(tmp_path / "o"), "--tasks", "medqa_4options", *flags]  # fmt: skip
    assert main(argv) == 2
    assert _one_error_line(capsys).startswith(message.format(empty=empty))
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_without_local_data_fails_at_once(setup, tmp_path, capfd, unreachable_hub):
    """No network and no local copy: one probe of the hub, then the way out, not a minute of retries."""
    from salm import members
    from salm.cli import main

    argv = ["harness", "--models", str(tmp_path / "no_members.json"), "--tasks", "boolq", "--data_dir",
            str(tmp_path), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "Retrying" not in err
    assert err.strip().endswith(
        f"salm harness: error: --tasks boolq: no local copy in {tmp_path} (it needs boolq/validation.jsonl there); "
        "pass --data_dir DIR (or set SALM_DATA_DIR=DIR) holding them, or run where the Hugging Face hub is "
        "reachable (lm-eval's boolq)"
    )
    assert members.hub_offline()


def _quickstart_build(folder: Path, n: int = 4) -> Path:
    """A quickstart build's arithmetic splits as `salm quickstart` writes them (question, '#### N' solution)."""
    rows = [
        {"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have now?",
         "answer": f"{i} + {i + 2} = {2 * i + 2}.\n#### {2 * i + 2}", "domain": "math"}
        for i in range(2 * n)
    ]  # fmt: skip
    write_jsonl(folder / "data" / "math_train.jsonl", rows[:n])
    write_jsonl(folder / "data" / "math_test.jsonl", rows[n:])
    return folder


def test_quickstart_arithmetic_reads_the_members_answer_form(tmp_path):
    """The task shows the quickstart's prompt template and worked answers, and its strict match credits
    "the answer is: N" (what the members write), not GSM8K's "#### N"."""
    import lm_eval
    from lm_eval.api.model import LM

    from salm.data import build_prompt
    from salm.harness import task_manager

    build = _quickstart_build(tmp_path / "build")
    tests = [json.loads(line) for line in (build / "data" / "math_test.jsonl").read_text().splitlines()]
    gold = {build_prompt(r["question"]): r["answer"].rsplit("#### ", 1)[1] for r in tests}
    replies = iter([
        "Reasoning: ...\nTherefore, the answer is: {}",  # right, in the members' form
        "Reasoning: ...\nTherefore, the answer is: {}.",  # right, with a full stop
        "Reasoning: ...\n#### {}",  # GSM8K's form: not what this task's strict match reads
        "Reasoning: {} is close.\nTherefore, the answer is: 0",  # wrong (the number appears earlier)
    ])  # fmt: skip

    class Scripted(LM):
        contexts: list[str] = []

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            for r in requests:
                self.contexts.append(r.args[0])
                prompt = next(p for p in gold if r.args[0].endswith(p))
                out.append(next(replies).format(gold[prompt]))
            return out

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    lm = Scripted()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=["quickstart_arithmetic"], num_fewshot=1, bootstrap_iters=0,
        task_manager=task_manager(build, include_defaults=False),
    )  # fmt: skip
    r = res["results"]["quickstart_arithmetic"]
    assert r["exact_match,strict-match"] == 0.5  # the first two
    assert r["exact_match,flexible-extract"] == 0.75  # the last number: also "#### N"
    shot = next(
        s for s in (json.loads(line) for line in (build / "data" / "math_train.jsonl").read_text().splitlines())
    )
    assert all(c.endswith(tuple(gold)) and "\nTherefore, the answer is: " in c.split("\n\n")[0] for c in lm.contexts)
    assert any(c.startswith(build_prompt(shot["question"])) for c in lm.contexts)


def test_untrained_heads_and_the_settings_that_ran_are_recorded(setup, tmp_path):
    from salm.cli import main

    _, members, heads, _ = setup
    build = _quickstart_build(tmp_path / "build")
    argv = ["harness", "--models", str(members), "--data_dir", str(build), "--tasks", "quickstart_arithmetic",
            "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--batch_size", "3", "--max_gen_toks", "4",
            "--limit", "2.0", "--only_ensemble", "--no_plots"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert summary["settings"]["batch_size"] == 3 and summary["settings"]["limit"] == 2  # a whole number, as run
    assert summary["settings"]["weights"] is None
    assert summary["comparison"]["quickstart_arithmetic"]["models"]["ensemble"]["n"] == 2
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "**Heads: UNTRAINED (random initialisation; no --weights)" in table
    assert "| quickstart_arithmetic (quickstart_arithmetic, exact_match,strict-match) | 2 |" in table
    assert main([*argv, "--weights", str(heads), "--output_dir", str(tmp_path / "trained")]) == 0
    assert f"Heads: `{heads}`." in (tmp_path / "trained" / "comparison.md").read_text()


MY_TASK = """task: my_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:\\n"
target_delimiter: ""
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_tasks_of_your_own_from_include_path_and_members_reused_with_other_heads(setup, tmp_path, capsys):
    """A task YAML of the user's own runs through --include_path (lm-eval's flag); a second run in the same folder
    with other heads and routing reruns only the ensemble: the members' results do not depend on the heads."""
    from salm.cli import main
    from salm.ensemble import MultiModelWithScalarHeads

    colours = ["red", "blue", "green", "black"]
    rows = [{"question": f"What colour is thing {i}?", "choices": colours, "label": i % 4} for i in range(6)]
    data = write_jsonl(tmp_path / "facts.jsonl", rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_facts.yaml").write_text(MY_TASK.format(path=data))
    out = tmp_path / "run"
    assert main(_argv(setup, out, "--tasks", "my_facts", "--include_path", str(tasks))) == 0
    for name in ("ensemble", "tiny-0", "tiny-1"):
        res = json.loads((out / name / "results.json").read_text())
        assert res["n-samples"]["my_facts"]["effective"] == 6
        assert all(len(r["filtered_resps"]) == 4 for r in _samples(out / name, "my_facts"))  # every choice scored
    other = MultiModelWithScalarHeads(json.loads(setup[1].read_text())["members"], device="cpu", router="aware")
    other = other.save_pretrained(tmp_path / "other-heads")
    capsys.readouterr()
    argv = _argv(setup, out, "--tasks", "my_facts", "--include_path", str(tasks), "--weights", str(other))
    assert main([*argv, "--routing", "mixture"]) == 0
    err = capsys.readouterr().err
    assert "tiny-0: reusing" in err and "tiny-1: reusing" in err and "ensemble: reusing" not in err
    assert main(_argv(setup, out, "--tasks", "my_facts", "--include_path", str(tmp_path / "nowhere"))) == 2
    assert f"--include_path {tmp_path / 'nowhere'}: not a folder" in capsys.readouterr().err
