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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_mode_of_a_plain_write(tmp_path, umask):
    """Files and folders from atomic_path get the mode open(..., "w") / os.mkdir give under the umask (not
    mkstemp's 0600), including when they replace an existing target; the oracle is a plain write in the same
    process."""
    import os
    import stat

    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        plain_dir = tmp_path / "plain_dir"
        plain_dir.mkdir()
        target, folder = tmp_path / "out.bin", tmp_path / "peft"
        for _ in range(2):  # new target, then replacing it
            with atomic_path(target) as tmp:
                tmp.write_text("new")
            with atomic_path(folder, directory=True) as tmp:
                (tmp / "a.txt").write_text("new")
            assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
            assert stat.S_IMODE(folder.stat().st_mode) == stat.S_IMODE(plain_dir.stat().st_mode) == 0o777 & ~umask
    finally:
        os.umask(old)
