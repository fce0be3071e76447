"""Atomic writes: readable like ordinary files, and a failed write leaves the old file and no debris."""

from __future__ import annotations

import os
import stat

import pytest

from salm import io


def test_written_files_get_ordinary_permissions(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_UMASK", 0o022)
    path = io.atomic_write_json(tmp_path / "sub" / "report.json", {"a": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert path.read_text() == '{\n  "a": 1\n}\n'


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def boom(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
