from __future__ import annotations

import pytest

from toolkit.fileutil import atomic_path


def test_file_replaced_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_directory_swap(tmp_path):
    target = tmp_path / "peft"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "old"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]
