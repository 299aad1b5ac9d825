"""Pretrained weights by name: the model zoo, and turning any weights source into a local
file or folder (:func:`resolve`), downloading once.

Sources: a path (checkpoint file or Hugging Face model folder), a zoo name (``qdet zoo``
lists them), or an ``hf:owner/name`` Hub id. Plain URLs are downloaded with urllib to
``$QDET_HOME/checkpoints/<the release's own file name>`` (``QDET_HOME`` defaults to
``~/.cache/qdet``): into a temporary file in that folder, renamed only once complete (the
byte count the server announced, the size the zoo lists) and verified (the sha256 prefix a
release's file name carries), so an interrupted or corrupt download never leaves a file that
loads. A file already there is used without touching the network. Hub ids go through
``huggingface_hub`` (its own cache; ``HF_HUB_OFFLINE=1`` keeps it off the network).
"""
from __future__ import annotations

import difflib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CHUNK = 1 << 16


class ZooError(ValueError):
    """A source that cannot be turned into local weights; one line saying what to do."""


@dataclass(frozen=True)
class ZooEntry:
    """One released detector. Exactly one of ``url`` (direct download), ``hf`` (Hub id) or
    ``page`` (no direct link: where to get ``file`` by hand) says where it comes from."""
    name: str                   # the zoo name, e.g. "detr-r50"
    method: str                 # qdet architecture (``--arch``)
    backbone: str               # e.g. "R50", "R101-DC5"
    ap: float | None            # COCO val2017 box AP the release reports
    size: int | None = None     # bytes of the file (None: not established)
    url: str | None = None
    hf: str | None = None
    page: str | None = None
    file: str | None = None     # the release's own file name (cache name)
    sha256: str | None = None   # start of the file's sha256, where its name carries one

    @property
    def source(self) -> str:
        return self.url or (f"hf:{self.hf}" if self.hf else f"by hand: {self.page}")


# The releases (qdet/zoo.py is the one place they are listed; README "Pretrained weights").
ENTRIES: list[ZooEntry] = []
ZOO: dict[str, ZooEntry] = {e.name: e for e in ENTRIES}


def qdet_home() -> Path:
    return Path(os.environ.get("QDET_HOME") or Path.home() / ".cache" / "qdet")


def cache_path(entry: ZooEntry) -> Path:
    """Where a release's file lives once downloaded (or is put by hand)."""
    return qdet_home() / "checkpoints" / entry.file


def is_cached(entry: ZooEntry) -> bool:
    if entry.hf:
        return hf_folder(entry.hf, offline=True) is not None
    return cache_path(entry).is_file()


# --------------------------------------------------------------------------- downloads


def _by_hand(url: str, dest: Path) -> str:
    return f"download {url} on a machine with network access and put it at {dest}"


def download(url: str, dest: Path, sha256: str | None = None, size: int | None = None,
             progress: Callable[[int, int | None], None] | None = None,
             timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically: a temporary file beside ``dest``, renamed
    only when the byte count matches what the server announced and ``size``, and the
    sha256 starts with ``sha256``; anything else deletes it and raises :class:`ZooError`.
    ``progress(done, total)`` is called as bytes arrive."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    digest, done = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    announced = resp.headers.get("Content-Length")
                    total = int(announced) if announced else size
                    if progress:
                        progress(0, total)
                    while chunk := resp.read(CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
            except (urllib.error.URLError, http.client.HTTPException, OSError,
                    ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise ZooError(f"cannot download {url} ({reason}); {_by_hand(url, dest)}"
                               ) from None
        expected = [n for n in (announced and int(announced), size) if n]
        if any(done != n for n in expected):
            raise ZooError(f"download of {url} stopped after {done} of {expected[0]} bytes "
                           f"(nothing was kept); run again, or {_by_hand(url, dest)}")
        got = digest.hexdigest()
        if sha256 and not got.startswith(sha256):
            raise ZooError(f"{url}: checksum mismatch (sha256 {got[:len(sha256)]}..., expected "
                           f"{sha256}...), the file was deleted; run again, or "
                           f"{_by_hand(url, dest)}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def download_with_bar(url: str, dest: Path, sha256: str | None = None,
                      size: int | None = None) -> Path:
    """:func:`download` with a progress bar on the terminal (stderr)."""
    from .terminal import download_bar

    with download_bar() as bar:
        task = bar.add_task(dest.name, total=size)

        def progress(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        return download(url, dest, sha256, size, progress)


def fetch(entry: ZooEntry) -> Path:
    """The local file or folder of a zoo entry, downloaded if not cached."""
    if entry.hf:
        return hub_folder(entry.hf)
    dest = cache_path(entry)
    if dest.is_file():
        return dest                 # only complete, verified files are ever renamed here
    if entry.url is None:
        raise ZooError(f"{entry.name} has no direct download: get {entry.file} from "
                       f"{entry.page} and put it at {dest}")
    return download_with_bar(entry.url, dest, entry.sha256, entry.size)


# -------------------------------------------------------------------- Hugging Face Hub

HF_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_folder(repo_id: str, offline: bool = False) -> Path | None:
    """The local folder (config.json + weights) of Hub model ``repo_id`` in huggingface_hub's
    cache, downloading what is missing; with ``offline``, only what is cached (None if not).
    Raises :class:`ZooError` with what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    def get(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, local_files_only=offline))

    by_hand = (f"run once with network access (or HF_HUB_OFFLINE unset), or download the "
               f"repository's config.json and model.safetensors into a folder and pass its "
               f"path")
    try:
        config = get("config.json")
        local_miss = False
        for name in HF_FILES:
            try:
                get(name)
                return config.parent
            except RemoteEntryNotFoundError:
                continue
            except LocalEntryNotFoundError:
                local_miss = True
        if local_miss:
            raise LocalEntryNotFoundError("weights not cached")
        raise ZooError(f"hf:{repo_id} has config.json but no {' or '.join(HF_FILES)}; qdet "
                       "reads model weights in those files")
    except LocalEntryNotFoundError:
        if offline:
            return None
        raise ZooError(f"hf:{repo_id}: the Hub cannot be reached and the model is not in the "
                       f"Hugging Face cache; {by_hand}") from None
    except GatedRepoError:
        raise ZooError(f"hf:{repo_id} is gated: accept its terms on the Hub and log in "
                       "(`hf auth login`), then run again") from None
    except RepositoryNotFoundError:
        raise ZooError(f"hf:{repo_id}: no such model on the Hugging Face Hub (or it is "
                       "private); check the id, written hf:owner/name") from None
    except RevisionNotFoundError as e:
        raise ZooError(f"hf:{repo_id}: {e}") from None
    except HfHubHTTPError as e:
        raise ZooError(f"hf:{repo_id}: the Hub answered {str(e).splitlines()[0]}") from None
    except ValueError as e:     # huggingface_hub's own validation of the id
        raise ZooError(f"hf:{repo_id}: not a Hub model id ({str(e).splitlines()[0]}); "
                       "write hf:owner/name") from None


def hub_folder(repo_id: str) -> Path:
    folder = hf_folder(repo_id)
    assert folder is not None
    return folder


# ----------------------------------------------------------------------------- resolve


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or Path(source).suffix in (
        ".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def resolve(source: str | os.PathLike) -> Path:
    """A weights source -> a local checkpoint file or HF model folder: an existing path as
    it is, ``hf:owner/name`` through the Hub cache, a zoo name through the qdet cache
    (downloading once). An unknown name is an error that lists the closest zoo names."""
    text = str(source)
    if os.path.exists(text):
        return Path(text)
    if text.startswith("hf:"):
        return hub_folder(text[3:])
    if text in ZOO:
        return fetch(ZOO[text])
    if _looks_like_path(text):
        raise FileNotFoundError(f"checkpoint {text!r} not found (nor a zoo name or hf: id)")
    close = difflib.get_close_matches(text, list(ZOO), n=4, cutoff=0.4)
    hint = f"closest: {', '.join(close)}" if close else f"names: {', '.join(ZOO) or 'none'}"
    raise ZooError(f"{text!r} is neither a file nor a zoo name ({hint}); `qdet zoo` lists "
                   "them, and hf:owner/name reads a Hugging Face Hub model")
