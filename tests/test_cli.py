"""The command line as a new user meets it: help with defaults, exit codes, an unreachable hub, clean logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from salm import members
from salm.cli import EXIT_BAD_INPUT, build_parser, main
from salm.testing import write_member_set
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser([command, "--help"]).parse_args([command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize(
    "command, shown",
    [
        ("generate", ["--temperature TEMPERATURE default: 0.7", "--top_k TOP_K default: 0", "(default: argmax)"]),
        ("evaluate", ["--temperature TEMPERATURE 0 = greedy (for every model) (default: 0.3)", "(default: 50)"]),
        ("train", ["--learning_rate LEARNING_RATE default: 0.001", "--warmup_ratio WARMUP_RATIO", "(default: 0.1)"]),
        ("quickstart", ["(default: salm_quickstart)", "--learning_rate LEARNING_RATE default: 0.003"]),
    ],
)
def test_every_command_help_shows_its_defaults(command, shown, capsys):
    text = _help(command, capsys)
    for s in shown:
        assert s in text, s


def test_no_dataset_is_bad_input_like_every_other_error(tiny_infos, tmp_path, capsys):
    members_file = write_member_set(tmp_path / "members.json", tiny_infos)
    missing = tmp_path / "missing.jsonl"
    rc = main(["evaluate", "--models", str(members_file), "--datasets", "x", "--data", f"x={missing}"])
    assert rc == EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err
    assert f"x: could not read {missing}" in err
    assert err.strip().endswith("salm evaluate: error: no dataset could be loaded; nothing was evaluated")


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_unreachable_hub_fails_at_once_with_what_to_do(command, unreachable_hub, tmp_path, capfd, caplog):
    """The default members, no network: one warning, then an error naming the ways out, without retries."""
    data = tmp_path / "arith.jsonl"
    data.write_text(json.dumps({"question": "What is 2 plus 3?", "answer": "Therefore, the answer is: 5"}) + "\n")
    argv = ["generate", "hi"] if command == "generate" else ["evaluate", "--datasets", "a", "--data", f"a={data}"]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capfd.readouterr().err
    warned = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warned) == 1 and unreachable_hub in warned[0]
    assert "Retrying" not in err + caplog.text
    error = [line for line in err.splitlines() if line.startswith(f"salm {command}: error:")]
    assert len(error) == 1
    assert "member 'qwen-25-15b': Qwen/Qwen2.5-1.5B is not in the local Hugging Face cache" in error[0]
    for way_out in ("--models FILE", "salm quickstart", "hf download Qwen/Qwen2.5-1.5B", "HF_HUB_OFFLINE=1"):
        assert way_out in error[0], way_out
    assert members.hub_offline()  # the rest of the process works from the cache, without more probes


def test_unreachable_hub_is_probed_once_per_process(unreachable_hub, monkeypatch):
    calls = []
    real = members._probe
    monkeypatch.setattr(members, "_probe", lambda endpoint: calls.append(endpoint) or real(endpoint))
    assert members.prepare_hub() is True
    assert members.prepare_hub() is True
    assert calls == [unreachable_hub]


def test_library_warnings_are_printed_once():
    """huggingface_hub and datasets log through their own handlers; the root handler must not repeat them."""
    code = (
        "import logging, huggingface_hub, datasets; from salm.cli import setup_logging; setup_logging(); "
        "logging.getLogger('huggingface_hub.utils._http').warning('hub-warning'); "
        "logging.getLogger('datasets.load').warning('datasets-warning'); "
        "logging.getLogger('salm.members').warning('salm-warning')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    for message in ("hub-warning", "datasets-warning", "salm-warning"):
        assert out.stderr.count(message) == 1, out.stderr


def test_evaluation_log_to_a_file_has_no_nested_bars(tiny_infos, tmp_path, capfd):
    """stderr captured (not a terminal): the datasets bar stays, the bars nested inside it do not."""
    rows = [{"question": f"What is {i} plus 1?", "answer": f"Therefore, the answer is: {i + 1}"} for i in range(2)]
    data = write_jsonl(tmp_path / "arith.jsonl", rows)
    argv = ["evaluate", "--models", str(write_member_set(tmp_path / "m.json", tiny_infos)), "--datasets", "a",
            "--data", f"a={data}", "--max_new_tokens", "3", "--no_plots", "--device", "cpu",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "datasets: 100%" in err
    assert "\x1b[A" not in err and "generating" not in err and "teacher forcing" not in err


def test_nested_bars_show_on_a_terminal(monkeypatch):
    from salm.display import nested_progress

    class Terminal:
        def isatty(self) -> bool:
            return True

    assert nested_progress(True) is False  # pytest captures stderr: not a terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert nested_progress(True) is True and nested_progress(False) is False


def test_every_loss_config_field_is_a_train_flag_with_its_default_and_help():
    """A new loss term is one LossConfig field: salm train grows its flag (name, default, help) by itself,
    and the flag's value reaches the config the command builds."""
    from dataclasses import fields

    from salm.commands.train import config_from_args
    from salm.loss import LossConfig

    parser = build_parser(["train"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    by_flag = {a.option_strings[0]: a for a in sub._actions if a.option_strings}
    for f in fields(LossConfig):
        action = by_flag[f"--{f.name}"]
        assert action.default == f.default and action.help.startswith(f.metadata["help"])
    args = parser.parse_args(["train", "--disagreement_weight", "3", "--allow_negative_entropy_weight"])
    loss = config_from_args(args).loss
    assert loss == LossConfig(disagreement_weight=3.0, allow_negative_entropy_weight=True)


@pytest.mark.parametrize("command", ["train", "evaluate", "quickstart", "knowledge", "harness"])
def test_default_output_folders_are_git_ignored(command):
    """A newcomer's first runs must not show up as untracked files in the checkout."""
    default = Path(build_parser([command]).parse_args([command]).output_dir)
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert f"{default.as_posix()}/" in ignored


def test_make_quickstart_installs_only_the_package():
    """`make quickstart` installs what the quickstart needs (the package), not the test suite's dev extra."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Run as a top-level make: under `make test` the inherited MAKELEVEL makes make print
    # "Entering/Leaving directory" lines around the recipe.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}

    def dry_run(target: str) -> str:
        cmd = ["make", "-n", "--no-print-directory", target]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout

    out = dry_run("quickstart").splitlines()
    installs = [line for line in out if " pip install " in line]
    assert len(installs) == 1 and installs[0].endswith("pip install -q -e .")
    assert "quickstart" in out[-1]
    dev = dry_run("test")
    assert 'pip install -q -e ".[dev]"' in dev
