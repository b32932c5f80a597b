"""Atomic output: write to a temp path beside the target, rename into place only on success."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; elsewhere it can only be read by setting it,
    which is not thread-safe, so that is the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or directory) path in the target's folder; on success it replaces `path`.

    On any exception the temporary is removed and the old `path` (if any) is left untouched. The result gets
    the mode a new file made by open(path, "w") (0666) or os.mkdir (0777) would get under the umask, not
    mkstemp's private 0600/0700, so outputs meant for other users are readable by them. A replaced target
    does not pass its own mode on: the rename makes a new file, and it gets a new file's mode.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # after the writer: it may have replaced the temp file with a new one of its own
        os.chmod(tmp, (0o777 if directory else 0o666) & ~current_umask())
        if directory:
            if target.exists():
                # swap: move the old folder aside first so a crash never leaves neither
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
