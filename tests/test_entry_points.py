"""The seed's entry points (answer_generator.py, src.*) and the CLI's lazy loading."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from salm.testing import write_member_set
from tests.conftest import modules_imported_by

REPO = Path(__file__).resolve().parents[1]


def test_answer_generator_writes_the_seeds_json(tiny_infos, tiny_ensemble, tmp_path, capsys):
    import answer_generator

    heads = tiny_ensemble.save_pretrained(tmp_path / "heads")
    out = tmp_path / "answer_confidence.json"
    members = write_member_set(tmp_path / "members.json", tiny_infos)
    argv = ["What is 2 + 3?", "--models", str(members), "--weights-path", str(heads),
            "--output", str(out), "--max-tokens", "6", "--temperature", "0", "--device", "cpu"]  # fmt: skip
    assert answer_generator.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"question", "answer", "tokens"} and result["question"] == "What is 2 + 3?"
    assert 1 <= len(result["tokens"]) <= 6
    ids = [i.id for i in tiny_infos]
    for tok in result["tokens"]:
        assert set(tok) == {"token", "token_id", "best_model", "confidence_scores"}
        assert tok["best_model"] in ids and list(tok["confidence_scores"]) == ids
        assert math.isclose(sum(tok["confidence_scores"].values()), 1.0, rel_tol=1e-5)
        assert tok["best_model"] == max(tok["confidence_scores"], key=tok["confidence_scores"].get)
    # Per-token texts cannot be joined back (a character split over two tokens decodes to U+FFFD in each):
    # the answer is the decoding of the tokens' ids together.
    ids_out = [t["token_id"] for t in result["tokens"]]
    assert tiny_ensemble.tokenizer.decode(ids_out, skip_special_tokens=True).strip() == result["answer"].strip()
    assert capsys.readouterr().out.strip() == result["answer"].strip()


def test_answer_generator_missing_weights_is_an_error_not_random_heads(tiny_infos, tmp_path, capsys):
    import answer_generator

    out = tmp_path / "a.json"
    missing = tmp_path / "nope" / "best_model_heads.pt"
    members = write_member_set(tmp_path / "members.json", tiny_infos)
    argv = ["q", "--models", str(members), "--weights-path", str(missing),
            "--output", str(out), "--device", "cpu"]  # fmt: skip
    assert answer_generator.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("answer_generator: error:") and str(missing) in err
    assert not out.exists()


def test_seed_import_paths():
    import salm.ensemble
    import salm.members
    from src.architecture import MultiModelWithScalarHeads
    from src.models import MODELS

    assert MultiModelWithScalarHeads is salm.ensemble.MultiModelWithScalarHeads
    assert MODELS is salm.members.MODELS
    assert [m.id for m in MODELS] == ["qwen-25-15b", "qwen-25-15b-med", "qwen-25-15b-math"]


def test_cli_help_imports_no_step_module():
    code = "from salm.cli import build_parser; build_parser([]).format_help()"
    heavy = ("torch", "salm.training", "salm.evaluation.runner", "salm.commands.train")
    assert modules_imported_by(code, heavy) == []


def test_no_library_module_imports_the_command_layer_or_argparse():
    """Commands sit on top of the library: below salm/cli.py and salm/commands/ nothing imports them,
    and nothing parses flags (the library takes typed configs, never an argparse Namespace)."""
    import ast

    offenders = []
    for path in sorted((REPO / "salm").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "salm/cli.py" or rel.startswith("salm/commands/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "argparse" or name.split(".")[:2] in (["salm", "cli"], ["salm", "commands"]):
                    offenders.append(f"{rel}:{node.lineno} imports {name}")
    assert offenders == []


def test_seed_train_script_runs_without_an_install(tmp_path):
    """``python src/train.py`` imports ``salm`` from its own checkout, installed or not.

    A copy of the checkout (``salm/`` and ``src/``) is not installed anywhere, and the installed ``salm``
    (editable, pointing at this worktree) is still importable: only the script's own path setup can make
    the copy's ``salm`` the one that runs. Its ``__init__`` prints a marker to prove it.
    """
    import shutil

    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "salm", copy / "salm", ignore=ignore)
    shutil.copytree(REPO / "src", copy / "src", ignore=ignore)
    with (copy / "salm" / "__init__.py").open("a") as f:
        f.write("\nimport sys as _sys\n\nprint('salm imported from the copy', file=_sys.stderr)\n")
    out = subprocess.run(
        [sys.executable, str(copy / "src" / "train.py"), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "salm imported from the copy" in out.stderr
    assert "--datasets" in out.stdout and "--output_dir" in out.stdout  # the train command's own help
