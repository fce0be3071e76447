"""Shared fixtures: tiny random members built once per session (CPU, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The generation equivalences can be rerun on a GPU: SALM_TEST_DEVICE=cuda pytest tests/test_generation.py
TEST_DEVICE = os.environ.get("SALM_TEST_DEVICE", "cpu")


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
