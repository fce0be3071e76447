"""Shared fixtures: tiny random members built once per session (CPU, no network), and an isolated environment.

No test reads or writes the user's environment: caches, Hugging Face's home and the home folder all point
at temporary folders. Hugging Face libraries read ``HF_HOME`` once, at import (before any fixture runs), so
it is set for the whole session here, at collection; the autouse fixtures below then give the session's
module fixtures one private set of folders and every test its own (``SALM_CACHE`` is read at every use).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["MPLBACKEND"] = "Agg"
# What the user had, before the overrides below: tests/test_isolation.py checks that nothing points there.
USER_ENV = {v: os.environ.get(v) for v in ("SALM_CACHE", "HF_HOME", "HOME", "XDG_CACHE_HOME")}
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="salm-tests-"))
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
for _var, _sub in (("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "hf/datasets"), ("MPLCONFIGDIR", "matplotlib")):
    os.environ[_var] = str(_SESSION_HOME / _sub)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The generation equivalences can be rerun on a GPU: SALM_TEST_DEVICE=cuda pytest tests/test_generation.py
TEST_DEVICE = os.environ.get("SALM_TEST_DEVICE", "cpu")

# Read at run time by saLM or the libraries it calls; each points into a per-test (or per-session) folder.
ISOLATED_DIRS = {
    "SALM_CACHE": "salm-cache",
    "HOME": "home",
    "XDG_CACHE_HOME": "home/.cache",
    "XDG_CONFIG_HOME": "home/.config",
    "WANDB_DIR": "wandb",
    "WANDB_CONFIG_DIR": "wandb/config",
    "WANDB_CACHE_DIR": "wandb/cache",
    "WANDB_DATA_DIR": "wandb/data",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
}
UNSET = ("SALM_DATA_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME")


def isolate_environment(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """Point every variable of :data:`ISOLATED_DIRS` into ``root``; unset the user's data and wandb run choices."""
    for var, sub in ISOLATED_DIRS.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(root / sub))
    for var in UNSET:
        mp.delenv(var, raising=False)
    mp.setenv("WANDB_MODE", "offline")  # a test that starts wandb by mistake never reaches the network
    return root


@pytest.fixture(scope="session", autouse=True)
def _session_environment(tmp_path_factory: pytest.TempPathFactory):
    """The environment of session- and module-scoped fixtures (member builds, quickstart runs)."""
    with pytest.MonkeyPatch.context() as mp:
        yield isolate_environment(mp, tmp_path_factory.mktemp("session-env"))


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's own cache, home and wandb folders (the folder holding them is returned)."""
    return isolate_environment(monkeypatch, tmp_path_factory.mktemp("env"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from salm.testing import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_infos(tmp_path_factory, tiny_tokenizer):
    """Three members: two Qwen2 and one Llama, with different hidden sizes."""
    from salm.testing import build_tiny_members

    root = tmp_path_factory.mktemp("members")
    return build_tiny_members(
        root, 3, tokenizer=tiny_tokenizer, hidden_sizes=[32, 48, 32], archs=["qwen2", "llama", "qwen2"]
    )


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_infos):
    from salm.ensemble import MultiModelWithScalarHeads

    return MultiModelWithScalarHeads(tiny_infos, device=TEST_DEVICE).eval()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public datasets not found at {SHARED_DATA} (../shared/data from the repo root)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a busy 2-core machine run far faster on one thread (no OpenMP spin-waits).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
