"""Shared fixtures: tiny random members built once per session (CPU, no network), and an isolated environment;
and the helpers several test modules use (``from tests.conftest import fresh, batch, ...``), defined once here.

No test reads or writes the user's environment: caches, Hugging Face's home and the home folder all point
at temporary folders. Hugging Face libraries read ``HF_HOME`` once, at import (before any fixture runs), so
it is set for the whole session here, at collection; the autouse fixtures below then give the session's
module fixtures one private set of folders and every test its own (``SALM_CACHE`` is read at every use).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ["MPLBACKEND"] = "Agg"
# dtype="auto" picks bf16 on CPUs that multiply it natively: the suite pins float32 so it checks the same
# numbers on every CPU (tests/test_cpu.py checks the choice itself, with the detection monkeypatched).
os.environ["SALM_CPU_DTYPE"] = "float32"
# Real members' linear layers are packed for oneDNN at load (salm/cpu.py); tiny ones would not be (by size): the
# suite packs its tiny members too, so every equivalence below also covers the kernels real members run.
os.environ["SALM_CPU_PACK"] = "1"
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


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Hub access switched on (the suite runs offline) but pointed at a closed local port: a connection is
    refused at once, as on a machine without network, and offline mode is back after the test."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    import datasets.config

    for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, attr, False)
    from salm import members

    monkeypatch.setattr(members, "_hub_probe", {})
    return constants.ENDPOINT


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a busy 2-core machine run far faster on one thread (no OpenMP spin-waits).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- shared helpers
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Question: what is two plus three?\nAnswer:\n",
    "def add",
    "The patient presented with fever and cough; the doctor",
]


def fresh(ens, seed: int = 0, **kw):
    """A new ensemble over ``ens``'s already loaded members, with new seeded heads of the same settings.

    Cheap (no member is reloaded) and keeps tests independent of heads another test trained. ``kw``
    overrides the constructor's arguments: ``head_config=``, single ``head_hidden_dim``/``head_dropout``/
    ``head_norm``/``router`` keywords, ``device``; the router is ``seed`` unless asked for.
    """
    import dataclasses

    import torch

    from salm.ensemble import MultiModelWithScalarHeads

    torch.manual_seed(seed)
    kw = {"head_config": dataclasses.replace(ens.head_config, router="seed"), "device": ens.device, **kw}
    return MultiModelWithScalarHeads(
        ens.infos, dtype=ens.dtype, members=ens.members, tokenizer=ens.tokenizer, **kw
    ).eval()


def batch(ens, texts: Sequence[str]):
    """(input_ids, attention_mask) of ``texts`` with the ensemble's tokenizer, padded."""
    enc = ens.tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def seed_state(ens, ids: Sequence[str]) -> dict[str, Any]:
    """A state dict in the seed's layout: BatchNorm heads (with running statistics) under projection_heads.<id>."""
    import torch

    from salm.heads import ScalarProjectionHead

    state = {}
    torch.manual_seed(7)
    for mid, h in zip(ids, ens.hidden_sizes):
        seed_head = ScalarProjectionHead(h, 256, norm="batch")
        for mod in seed_head.non_linear_projection:
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
        state.update({f"projection_heads.{mid}.{k}": v for k, v in seed_head.state_dict().items()})
    return state


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """``rows`` as a UTF-8 JSON-lines file (parent folders created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def math_examples(n: int = 3):
    """``n`` arithmetic :class:`salm.data.Example` rows in the pipeline's answer format."""
    from salm.data import Example

    return [
        Example(
            id=f"arith/test/{i}",
            dataset="arith",
            question=f"What is {i} plus {i + 1}?",
            answer=f"Reasoning: {i} + {i + 1} = {2 * i + 1}.\nTherefore, the answer is: {2 * i + 1}",
            label=str(2 * i + 1),
        )
        for i in range(n)
    ]


def write_task_data(folder: Path, n: int = 6) -> Path:
    """Tiny jsonl copies in the shared-data layout (gsm8k train/test, medqa test, boolq validation)."""
    gsm = [
        {"question": f"Tom has {i} apples and buys {i + 2} more. How many?", "answer": f"{i}+{i + 2}\n#### {2 * i + 2}"}
        for i in range(2 * n)
    ]
    write_jsonl(folder / "gsm8k/train.jsonl", gsm[:n])
    write_jsonl(folder / "gsm8k/test.jsonl", gsm[n:])
    options = {"A": "rest", "B": "fluids and rest", "C": "aspirin", "D": "surgery"}
    med = [
        {"question": f"Patient {i} has a fever. Treatment?", "options": options, "answer_idx": "ABCD"[i % 4]}
        for i in range(n)
    ]
    write_jsonl(folder / "medqa/test_4options.jsonl", med)
    boolq = [{"question": f"is {i} even", "passage": f"The number {i}.", "answer": i % 2 == 0} for i in range(n)]
    write_jsonl(folder / "boolq/validation.jsonl", boolq)
    return folder


def modules_imported_by(code: str, modules: Iterable[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code`` (e.g. building ``--help``)."""
    probe = f"{code}; import json, sys; print(json.dumps(sorted(m for m in {list(modules)!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class FinishedTexts:
    """Sinks for the server engine's requests: ``sink(i)`` records request ``i``'s final text and sets
    ``done[i]``; ``wait()`` waits for all of them, ``texts()`` lists them in request order."""

    def __init__(self, n: int):
        import threading

        self.got: dict[int, str] = {}
        self.done = {i: threading.Event() for i in range(n)}

    def sink(self, i: int):
        from salm.serve.engine import FinishEvent

        def on(event):
            if isinstance(event, FinishEvent):
                self.got[i] = event.text
                self.done[i].set()

        return on

    def wait(self, timeout: float = 60) -> bool:
        return all(e.wait(timeout) for e in self.done.values())

    def texts(self) -> list[str]:
        return [self.got[i] for i in range(len(self.done))]
