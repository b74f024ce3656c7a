"""Atomic file writes: a file appears under its final name complete, or not at all.

File mode: a written file gets the mode any ordinary ``open(path, "w")`` would give it,
``0o666`` less the process umask (or what a default ACL of the folder prescribes), so
colleagues on a shared server can read outputs where the umask lets them. The
temporary file is created with that mode by the kernel itself (``os.open`` with
``0o666``), so the umask is never read or changed (``os.umask`` is process-wide and
changing it to read it races with other threads).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]

_FLAGS = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
          | getattr(os, "O_BINARY", 0))


def _create_temporary(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file ``folder/prefix<random>suffix`` with mode 0o666 & ~umask."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, _FLAGS, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"no free temporary name for {prefix}...{suffix} in {folder}")  # pragma: no cover


@contextlib.contextmanager
def atomic_path(final: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success.

    The temporary name keeps ``suffix`` (e.g. ``.seg.nrrd``) so writers that pick a
    format from the extension still work. On any exception the temporary file is
    removed and ``final`` is left exactly as it was. The final file has the mode a
    newly created file gets under the current umask (also when it replaces a file).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temporary(final.parent, f".{final.name}.", f".tmp{suffix}")
    try:
        mode = stat.S_IMODE(os.stat(tmp_path).st_mode)
        yield tmp_path
        info = tmp_path.stat() if tmp_path.exists() else None
        if info is None or info.st_size == 0:
            raise OSError(f"writing {final} produced no data")
        if stat.S_IMODE(info.st_mode) != mode:  # a writer that replaced the file with its own mode
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(final: PathLike, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(final)


def atomic_write_text(final: PathLike, text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))
