"""The one way qdet writes a file: atomically.

Every file (checkpoints, ``config.json``, ``results.csv``, figures, ONNX files, downloads,
results JSON) is written under a temporary name in its own folder, flushed to the disk
(fsync), and only then renamed over its real name. A reader never sees half a file, and a
crash, a full disk or a ``kill -9`` mid-write leaves the previous file intact (at worst a
temporary ``.NAME.XXXXXXXX.tmp`` stays behind, which :func:`remove_stale_temporaries`
clears).

The temporary file is created with mode 0o666 and the process umask applied by the kernel,
as any ordinary program's files are: on a shared machine teammates read your checkpoints
when your umask lets them (0o022: 0644), and a private umask (0o077) keeps them private.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import IO, Iterator

_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for its temporary file."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        if directory:       # some file systems do not open folders; the rename still holds
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file's path beside ``path`` (created empty, the parent folder too);
    whatever the block writes there replaces ``path`` when it ends without an error, and is
    deleted when it raises. For writers that take a file name (``onnx.save``,
    ``Figure.savefig``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` written atomically (see :func:`atomic_path`): for writers that
    take a file object (``torch.save``, ``csv``, ``json.dump``)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    if isinstance(data, str):
        with atomic_open(path, "w", encoding="utf-8", newline="") as f:
            f.write(data)
    else:
        with atomic_open(path, "wb") as f:
            f.write(data)
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder``; returns them."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()] \
        if folder.is_dir() else []
    for p in stale:
        p.unlink()
    return stale
