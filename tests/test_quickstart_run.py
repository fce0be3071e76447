"""The reduced quickstart (``--size tiny``): every stage runs, every report file appears, routing is learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from salm.cli import main

FILES = [
    "report.md",
    "quickstart_summary.json",
    "examples.html",
    "evaluation/report.md",
    "evaluation/evaluation_summary.json",
    "evaluation/arithmetic/results.json",
    "evaluation/arithmetic/predictions.jsonl",
    "evaluation/code/results.json",
    "training/best_model_heads.pt",
    "training/best_model/heads.safetensors",
    "training/metrics.jsonl",
    "training/loss_curves.png",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two quickstart runs into one folder: the first builds the members, the second must reuse them."""
    root = tmp_path_factory.mktemp("quickstart")
    argv = ["quickstart", "--size", "tiny", "--output_dir", str(root / "out"), "--members_dir", str(root / "members")]
    first = main(argv)
    summary1 = json.loads((root / "out" / "quickstart_summary.json").read_text())
    second = main(argv)
    summary2 = json.loads((root / "out" / "quickstart_summary.json").read_text())
    return root, (first, summary1), (second, summary2)


def test_every_report_file_is_written(runs):
    root, (rc, summary), _ = runs
    assert rc == (1 if not all(summary["checks"].values()) else 0)  # a failed check is exit 1
    # The tiny members cannot add, so the arithmetic checks are listed as not applicable rather than failed.
    assert set(summary["checks_not_applicable"]) == {"arithmetic>=math-2pts", "arithmetic>>others"}
    assert not set(summary["checks"]) & set(summary["checks_not_applicable"])
    missing = [f for f in FILES if not (root / "out" / f).is_file()]
    assert not missing
    report = (root / "out" / "report.md").read_text()
    assert "## Checks" in report and "Arithmetic accuracy" in report
    html = (root / "out" / "examples.html").read_text()
    for member in ("general", "code", "math"):
        assert member in html
    assert set(summary["nll"]) == {"code", "prose", "math", "mixed"}
    assert set(summary["arithmetic"]) == {"ensemble", "general", "code", "math"}


def test_examples_page_shows_the_gold_continuation_of_free_text(runs):
    import html as html_lib

    root, (_, summary), _ = runs
    page = (root / "out" / "examples.html").read_text()
    data = Path(summary["members"]["root"]) / "data"
    for domain in ("code", "prose"):
        first = json.loads((data / f"{domain}_test.jsonl").read_text().splitlines()[0])
        assert html_lib.escape(first["answer"].strip()[:60]) in page, domain
    assert "gold continuation" in page and "gold: <b>None</b>" not in page


def test_report_names_the_members_file_and_a_command_that_runs(runs, capsys):
    import shlex

    root, (_, summary), _ = runs
    tried = summary["try"]
    assert tried["members_file"] == summary["members"]["members_file"] == str(root / "members" / "members.yaml")
    report = (root / "out" / "report.md").read_text()
    assert tried["members_file"] in report and tried["command"] in report
    argv = shlex.split(tried["command"])
    assert argv[:2] == ["salm", "generate"] and argv[-1] == tried["question"]
    capsys.readouterr()
    assert main([*argv[1:-1], "--max_new_tokens", "4", "--device", "cpu", argv[-1]]) == 0
    assert capsys.readouterr().out.strip()  # the routed answer


def test_a_failed_check_is_exit_1(runs, monkeypatch, capsys):
    import copy

    from salm.quickstart import run as qs_run

    _, (_, summary), _ = runs
    passing = copy.deepcopy(summary)
    passing["checks"] = dict.fromkeys(passing["checks"], True)
    failing = copy.deepcopy(passing)
    failing["checks"]["nll_mixed<every_member"] = False
    argv = ["quickstart", "--size", "tiny", "--output_dir", "unused"]
    monkeypatch.setattr(qs_run, "run_quickstart", lambda settings: passing)
    assert main(argv) == 0
    monkeypatch.setattr(qs_run, "run_quickstart", lambda settings: failing)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "FAIL  nll_mixed<every_member" in captured.out
    assert captured.err.strip().endswith("salm quickstart: checks not met: nll_mixed<every_member")


def test_table_explains_a_negative_captured_share(runs):
    from salm.quickstart.run import CAPTURED_NOTE, format_table

    _, (_, summary), _ = runs
    assert CAPTURED_NOTE in format_table(summary)
    assert "below 0 the ensemble is behind the best member" in CAPTURED_NOTE


def test_routing_prefers_the_right_specialist_beyond_chance(runs):
    _, (_, summary), _ = runs
    # Chance is 1/3 with three members; untrained heads are near it.
    assert summary["nll"]["code"]["router_share"]["code"] > 0.6
    assert summary["nll"]["math"]["router_share"]["math"] > 0.6
    # Trained routing beats untrained heads on the held-out validation split.
    assert summary["training"]["best_val_nll"] < summary["training"]["initial_val_nll"]
    # The mixture can never be worse than its worst member on any token set, and here beats the average.
    mixed = summary["nll"]["mixed"]
    assert mixed["ensemble"] < sum(mixed["members"].values()) / len(mixed["members"])


def test_second_run_reuses_the_members(runs):
    _, (_, first), (rc, second) = runs
    assert rc == 0
    assert first["members"]["reused"] is False and second["members"]["reused"] is True
    assert second["members"]["root"] == first["members"]["root"]
    # Same seed, same data, same members: the same heads and numbers.
    assert second["nll"]["mixed"]["ensemble"] == pytest.approx(first["nll"]["mixed"]["ensemble"], rel=1e-5)


def test_the_built_members_work_with_every_command(runs, capsys):
    root, _, _ = runs
    summary = json.loads((root / "out" / "quickstart_summary.json").read_text())
    members = summary["members"]["members_file"]
    heads = str(root / "out" / "training" / "best_model")
    capsys.readouterr()
    rc = main(["generate", "--models", members, "--weights", heads, "--max_new_tokens", "8", "--temperature", "0",
               "--device", "cpu", "What is 2 + 3?"])  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # the routed answer
    assert "general" in captured.err  # the legend


def test_quickstart_rejects_a_foreign_members_dir(tmp_path, capsys):
    (tmp_path / "members").mkdir()
    (tmp_path / "members" / "notes.txt").write_text("mine")
    rc = main(["quickstart", "--size", "tiny", "--output_dir", str(tmp_path / "o"), "--members_dir",
               str(tmp_path / "members")])  # fmt: skip
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"salm quickstart: error: {tmp_path / 'members'} is not empty and holds no quickstart build; "
        "refusing to overwrite it"
    )
    assert (tmp_path / "members" / "notes.txt").read_text() == "mine"


def test_members_file_paths_are_relative(runs):
    import yaml

    root, _, _ = runs
    entries = yaml.safe_load((root / "members" / "members.yaml").read_text())
    rows = entries["members"] if isinstance(entries, dict) else entries
    assert all(not Path(r["path"]).is_absolute() for r in rows)  # the folder can be moved or shared
