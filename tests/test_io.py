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


def test_files_in_an_atomic_folder_get_ordinary_permissions(tmp_path, monkeypatch, tiny_infos):
    """safetensors writes 0600 files; a saved model folder must be as readable as any other output."""
    from salm.ensemble import MultiModelWithScalarHeads

    monkeypatch.setattr(io, "_UMASK", 0o022)
    folder = MultiModelWithScalarHeads(tiny_infos[:2], device="cpu").save_pretrained(tmp_path / "heads")
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in folder.iterdir()}
    assert modes == {"heads.safetensors": 0o644, "salm_config.json": 0o644}
    with io.atomic_dir(tmp_path / "tool") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "run.sh").touch(mode=0o700)
    assert stat.S_IMODE(os.stat(tmp_path / "tool" / "sub").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "tool" / "sub" / "run.sh").st_mode) == 0o755
