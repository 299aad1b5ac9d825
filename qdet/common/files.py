"""The one way qdet writes a file: atomically.

Every file (checkpoints, ``config.json``, ``results.csv``, figures, ONNX files, downloads,
results JSON) is written under a temporary name in its own folder, flushed to the disk
(fsync), and only then renamed over its real name. A reader never sees half a file, and a
crash, a full disk or a ``kill -9`` mid-write leaves the previous file intact (at worst a
temporary ``.NAME.XXXXXXXX.tmp`` stays behind, which :func:`remove_stale_temporaries`
clears).

Many small files written together (a converted dataset's label files and image links) may
skip the fsyncs (``durable=False``): each still appears whole or not at all, but a power cut
may lose the last ones; one fsync per file made 4,000 labels take half a minute. Their
writer writes its index file (``data.yaml``, the COCO JSON) last and durably, so that a
folder without it is visibly unfinished.

The temporary file is created with mode 0o666 and the process umask applied by the kernel,
as any ordinary program's files are: on a shared machine teammates read your checkpoints
when your umask lets them (0o022: 0644), and a private umask (0o077) keeps them private.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
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
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary file's path beside ``path`` (created empty, the parent folder too);
    whatever the block writes there replaces ``path`` when it ends without an error, and is
    deleted when it raises. For writers that take a file name (``onnx.save``,
    ``Figure.savefig``). ``durable=False`` skips the fsyncs (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, directory=True)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", durable: bool = True,
                **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` written atomically (see :func:`atomic_path`): for writers that
    take a file object (``torch.save``, ``csv``, ``json.dump``)."""
    with atomic_path(path, durable) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_atomic(path: str | os.PathLike, data: str | bytes, durable: bool = True) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    if isinstance(data, str):
        with atomic_open(path, "w", durable, encoding="utf-8", newline="") as f:
            f.write(data)
    else:
        with atomic_open(path, "wb", durable) as f:
            f.write(data)
    return Path(path)


# why a link cannot be made, by errno: another file system, or one without such links
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP,
            errno.EACCES}


def place_file(src: str | os.PathLike, dst: str | os.PathLike, copy: bool = False,
               durable: bool = False) -> str:
    """Put the file ``src`` at ``dst`` unchanged (never re-encoded), atomically, and say how:
    ``'hardlink'`` (the same file under a second name: no space, and it outlives a moved or
    deleted source), else ``'symlink'`` (an absolute symbolic link, where the source is on
    another file system), else, or with ``copy``, ``'copy'`` (byte for byte). A link shares
    the file: a tool that rewrites an image in place (Ultralytics re-saves a cut JPEG)
    changes the source too, so copy where the new files will be edited or moved away."""
    src = os.path.abspath(src)
    with atomic_path(dst, durable) as tmp:
        if not copy:
            os.unlink(tmp)
            for how, link in (("hardlink", os.link), ("symlink", os.symlink)):
                try:
                    link(src, tmp)
                    return how
                except OSError as e:
                    if e.errno not in _NO_LINK:
                        raise
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        shutil.copyfile(src, tmp)
        return "copy"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder``; returns them."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()] \
        if folder.is_dir() else []
    for p in stale:
        p.unlink()
    return stale
