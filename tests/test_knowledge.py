"""The knowledge-split benchmark at its tiny size: disjoint facts, the build cache, and coherent metrics."""

from __future__ import annotations

import json

import pytest

from salm.quickstart.knowledge import (
    ATTRIBUTES,
    KnowledgeRecipe,
    build_knowledge_members,
    knowledge_recipe,
    make_facts,
    member_ids,
    run_knowledge,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_facts_are_disjoint_and_deterministic():
    recipe = knowledge_recipe("default")
    facts = make_facts(recipe)
    assert facts == make_facts(recipe)
    owners_of: dict[str, set[str]] = {}
    for f in facts:
        owners_of.setdefault(f.person, set()).add((f.owner, f.role))
        assert f.value in ATTRIBUTES[f.attribute]
    assert all(len(o) == 1 for o in owners_of.values())  # a person belongs to one member and one role
    per_member = {m: {f.person for f in facts if f.owner == m} for m in member_ids(recipe)}
    assert [len(p) for p in per_member.values()] == [sum(recipe.people_per_member)] * recipe.n_members
    questions = {f.question for f in facts}
    assert len(questions) == len(facts)  # one template, no question asked twice
    with pytest.raises(ValueError, match="unknown knowledge-split size"):
        knowledge_recipe("huge")


def test_tiny_benchmark_runs_and_its_metrics_agree(tmp_path, capsys):
    summary = run_knowledge(
        "tiny", output_dir=tmp_path / "out", variants=["seed", "aware"], members_dir=str(tmp_path / "members"),
        num_epochs=2, progress=False,
    )  # fmt: skip
    recipe = knowledge_recipe("tiny")
    assert summary["test_questions"] == recipe.n_members * recipe.people_per_member[2] * len(ATTRIBUTES)
    for r in summary["variants"].values():
        acc, dec = r["generated_accuracy"], r["decisive_accuracy"]
        members = member_ids(recipe)
        assert set(acc) == {*members, "ensemble", "oracle"} and set(dec) == {*acc, "rule:max_top1", "rule:max_record"}
        # The oracle is right where any member is: never below the best member, never above their sum.
        for a in (acc, dec):
            assert max(a[m] for m in members) <= a["oracle"] <= min(1.0, sum(a[m] for m in members) + 1e-9)
            assert a["ensemble"] <= a["oracle"]
        assert abs(sum(r["router_share"].values()) - 1.0) < 1e-3
    saved = json.loads((tmp_path / "out" / "knowledge_summary.json").read_text())
    assert saved["variants"].keys() == summary["variants"].keys()
    cfg = json.loads((tmp_path / "out" / "aware" / "best_model" / "salm_config.json").read_text())
    assert cfg["heads"]["router"] == "aware"
    # A second build of the same recipe reuses the folder (nothing retrained).
    before = (tmp_path / "members" / "build_report.json").stat().st_mtime_ns
    capsys.readouterr()
    build_knowledge_members(recipe, tmp_path / "members", progress=True)
    assert (tmp_path / "members" / "build_report.json").stat().st_mtime_ns == before
    # Its progress lines are labelled as the command that prints them.
    assert capsys.readouterr().err.startswith("[salm knowledge] reusing knowledge-split members")


def test_refuses_a_foreign_members_dir(tmp_path):
    (tmp_path / "mine.txt").write_text("not a build")
    with pytest.raises(FileExistsError, match="holds no knowledge-split build"):
        build_knowledge_members(knowledge_recipe("tiny"), tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "not a build"
    assert isinstance(knowledge_recipe("tiny"), KnowledgeRecipe)
