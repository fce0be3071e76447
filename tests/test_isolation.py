"""The suite's own environment: no test reads or writes the user's caches or home folder."""

from __future__ import annotations

import os
from pathlib import Path

from salm.io import cache_root
from tests.conftest import ISOLATED_DIRS, USER_ENV


def test_each_test_has_its_own_cache_and_home(isolated_env: Path) -> None:
    assert cache_root() == isolated_env / ISOLATED_DIRS["SALM_CACHE"]
    assert Path.home() == isolated_env / ISOLATED_DIRS["HOME"]
    for var, user_value in USER_ENV.items():
        assert user_value is None or os.environ[var] != user_value, var


def test_hugging_face_reads_a_private_home() -> None:
    from huggingface_hub import constants

    assert USER_ENV["HF_HOME"] is None or constants.HF_HOME != USER_ENV["HF_HOME"]
    assert "salm-tests-" in constants.HF_HOME and constants.HF_HUB_OFFLINE


def test_a_cache_written_by_a_test_stays_in_its_folder(isolated_env: Path) -> None:
    marker = cache_root() / "written-by-a-test"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("x")
    assert marker.is_relative_to(isolated_env)
