"""Bad command-line input to generate, evaluate and answer_generator.py: one line, exit 2, before members load
(members files here name folders that do not exist, so loading them would fail with another message)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from salm.cli import main
from salm.members import ModelInfo
from salm.testing import write_member_set
from tests.conftest import REPO, write_jsonl

NOT_UTF8 = "Zoe has \udcff\udcfe 12"  # what Python makes of the bytes b"Zoe has \xff\xfe 12" in argv
HUGE = "99999999999999999999999"


@pytest.fixture
def unloadable(tmp_path) -> str:
    """A valid members file whose members cannot load: any error about them means the check came too late."""
    infos = [ModelInfo(mid, mid, str(tmp_path / "gone" / mid)) for mid in ("a", "b")]
    return str(write_member_set(tmp_path / "members.json", infos))


def _answer_generator(argv: list[str]) -> int:
    import answer_generator

    return answer_generator.main(argv)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize(
    "argv, error",
    [
        (["generate", NOT_UTF8], "salm generate: error: the prompt is not valid UTF-8: byte 0xff at byte position 8"),
        (["generate", "Zoe", "has \udcff"], "salm generate: error: prompt argument 2 is not valid UTF-8: byte 0xff at"),
        (["generate", "--seed", HUGE, "hi"], f"salm generate: error: seed must be >= 0 and < 2**63, got {HUGE}"),
        (["generate", "--seed", "-1", "hi"], "salm generate: error: seed must be >= 0 and < 2**63, got -1"),
        (
            ["generate", "--routing", "member:nobody", "hi"],
            "salm generate: error: routing 'member:nobody': unknown member 'nobody'; members are ['a', 'b']",
        ),  # fmt: skip
        (
            ["evaluate", "--seed", HUGE, "--data", "x=f.jsonl"],
            f"salm evaluate: error: random_seed: seed must be >= 0 and < 2**63, got {HUGE}",
        ),  # fmt: skip
        (
            ["evaluate", "--routing", "member:nobody", "--data", "x=f.jsonl"],
            "salm evaluate: error: routing 'member:nobody': unknown member 'nobody'",
        ),  # fmt: skip
        (
            ["evaluate", "--data", "a/b=f.jsonl", "--datasets", "a/b"],
            "salm evaluate: error: --data a/b=f.jsonl: NAME "
            "'a/b' must be non-empty, hold no '/' and not start with '.': it is used as a folder name in --output_dir",
        ),  # fmt: skip
    ],
)
def test_salm_commands(unloadable, tmp_path, capsys, monkeypatch, argv, error):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--models", unloadable]) == 2
    assert _error(capsys).startswith(error)


@pytest.mark.parametrize(
    "argv, error",
    [
        ([NOT_UTF8], "answer_generator: error: the question is not valid UTF-8: byte 0xff at byte position 8"),
        (["hi", "--seed", HUGE], f"answer_generator: error: seed must be >= 0 and < 2**63, got {HUGE}"),
        (["hi", "--routing", "member:c"], "answer_generator: error: routing 'member:c': unknown member 'c'"),
    ],
)
def test_answer_generator(unloadable, tmp_path, capsys, monkeypatch, argv, error):
    monkeypatch.chdir(tmp_path)
    assert _answer_generator([*argv, "--models", unloadable, "--output", str(tmp_path / "a.json")]) == 2
    assert (
        _error(capsys)
        .removeprefix(
            "warning: no trained heads at ./model_outputs/best_model_heads.pt; routing with UNTRAINED heads\n"
        )
        .startswith(error)
    )
    assert not (tmp_path / "a.json").exists()


def test_member_routing_is_checked_against_the_members_the_weights_name(tiny_infos, tmp_path, capsys):
    """No --models: the member set is the one the heads' salm_config.json names, read before any member loads."""
    from salm.ensemble import MultiModelWithScalarHeads

    heads = MultiModelWithScalarHeads(tiny_infos[:2], device="cpu").save_pretrained(tmp_path / "heads")
    config = json.loads((heads / "salm_config.json").read_text())
    for m in config["members"]:
        m["path"] = str(tmp_path / "gone" / m["id"])  # loading would fail
    (heads / "salm_config.json").write_text(json.dumps(config))
    assert main(["generate", "--weights", str(heads), "--routing", "member:tiny-9", "hi"]) == 2
    assert _error(capsys) == (
        "salm generate: error: routing 'member:tiny-9': unknown member 'tiny-9'; members are ['tiny-0', 'tiny-1']"
    )


def test_generate_says_when_the_heads_are_untrained(tiny_infos, tmp_path, capsys):
    members = str(write_member_set(tmp_path / "members.json", tiny_infos[:2]))
    argv = ["generate", "--models", members, "--device", "cpu", "--max_new_tokens", "2", "--temperature", "0", "hi"]
    assert main(argv) == 0
    assert "WARNING (salm generate): no --weights given: the routing heads are UNTRAINED (random)." in (
        capsys.readouterr().err
    )
    assert main([*argv, "--routing", "member:tiny-0"]) == 0  # the heads play no part
    assert "UNTRAINED" not in capsys.readouterr().err


def test_evaluate_runs_only_the_datasets_given_by_data(tiny_infos, tmp_path, capsys):
    """--data gsm8k=FILE alone evaluates gsm8k only; --datasets all adds the default tasks (offline: skipped)."""
    members = str(write_member_set(tmp_path / "members.json", tiny_infos[:2]))
    data = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 2 plus 3?", "answer": "2 + 3 = 5.\n#### 5"}])
    argv = ["evaluate", "--models", members, "--device", "cpu", "--data", f"gsm8k={data}", "--only_ensemble",
            "--max_new_tokens", "2", "--no_teacher_forced", "--no_plots"]  # fmt: skip
    argv += ["--output_dir", str(tmp_path / "o")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "o" / "evaluation_summary.json").read_text())
    assert list(summary["datasets"]) == ["gsm8k"] and summary["skipped"] == {}
    assert "skipping" not in capsys.readouterr().err
    assert main([*argv, "--datasets", "all", "--output_dir", str(tmp_path / "all")]) == 0
    assert "salm evaluate: skipping medqa" in capsys.readouterr().err


def test_every_weights_flag_is_spelled_weights(tiny_infos, tmp_path):
    """--weights everywhere; the seed's spellings stay as aliases."""
    from salm.cli import build_parser

    for command, alias in (("generate", "--weights_path"), ("evaluate", "--model_weights"),
                           ("harness", "--model_weights")):  # fmt: skip
        for flag in ("--weights", alias):
            args = build_parser([command]).parse_args([command, flag, "w", *(["hi"] if command == "generate" else [])])
            assert args.weights == "w"


def test_answer_generator_takes_weights_and_keeps_a_pipe_free_of_loading_bars(tiny_infos, tmp_path):
    """python answer_generator.py ... --weights DIR, its stderr a pipe: no Hugging Face progress bars in it."""
    from salm.ensemble import MultiModelWithScalarHeads

    members = write_member_set(tmp_path / "members.json", tiny_infos[:2])
    heads = MultiModelWithScalarHeads(tiny_infos[:2], device="cpu").save_pretrained(tmp_path / "heads")
    out = tmp_path / "a.json"
    cmd = [sys.executable, str(REPO / "answer_generator.py"), "hi", "--models", str(members), "--weights",
           str(heads), "--device", "cpu", "--max-tokens", "2", "--output", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"wrote {out} ({len(json.loads(out.read_text())['tokens'])} tokens)"]
    assert Path(out).is_file()
