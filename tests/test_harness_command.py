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
from tests.conftest import write_task_data  # noqa: E402

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
