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
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..common.files import atomic_open

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
    ap: float                   # COCO val2017 box AP the release reports
    size_mb: int | None = None  # the size the release states (None: not stated)
    url: str | None = None
    hf: str | None = None
    page: str | None = None
    file: str | None = None     # the release's own file name (the cache's name for it)
    sha256: str | None = None   # start of the file's sha256, where its name carries one
    note: str = ""

    @property
    def kind(self) -> str:
        """Where it comes from, in a word: "url", "hf" or "by hand"."""
        return "url" if self.url else "hf" if self.hf else "by hand"

    @property
    def source(self) -> str:
        return self.url or (f"hf:{self.hf}" if self.hf else self.page or "")


_DETR = "https://dl.fbaipublicfiles.com/detr/"
_CONDITIONAL = "https://github.com/DeppMeng/ConditionalDETR/releases/download/v1.0/"
_SPARSE = "https://github.com/PeizeSun/SparseR-CNN/releases/tag/v0.1"
_SPARSE_DRIVE = "https://drive.google.com/drive/u/1/folders/19UaSgR4OwqA-BhCs_wG7i6E-OXC5NR__"
_ANCHOR = "https://github.com/megvii-research/AnchorDETR#model"


def _detr(name: str, backbone: str, ap: float, mb: int, file: str) -> ZooEntry:
    """facebookresearch/detr's hubconf.py releases: the hex digits in a file name are the
    start of its sha256 (torch.hub's check_hash rule)."""
    return ZooEntry(name, "detr", backbone, ap, mb, url=_DETR + file, file=file,
                    sha256=file.rsplit("-", 1)[1].split(".")[0])


def _conditional(name: str, backbone: str, ap: float, file: str) -> ZooEntry:
    """Atten4Vis/ConditionalDETR's hubconf.py: release assets of the first author's fork
    (the README's OneDrive links expire); no checksum is published."""
    return ZooEntry(name, "conditional", backbone, ap, url=_CONDITIONAL + file, file=file)


_DINO = "https://github.com/IDEA-Research/DINO#model-zoo"
_DETREX = "https://github.com/IDEA-Research/detrex-storage/releases/download/"


def _detrex(name: str, backbone: str, ap: float, tag: str, file: str, note: str) -> ZooEntry:
    """detrex's DINO releases (GitHub release assets; no checksum is published)."""
    return ZooEntry(name, "dino", backbone, ap, url=f"{_DETREX}{tag}/{file}", file=file,
                    note=note)


def _manual(name: str, method: str, backbone: str, ap: float, page: str, file: str,
             note: str) -> ZooEntry:
    return ZooEntry(name, method, backbone, ap, page=page, file=file, note=note)


# The releases: this is the one place they are listed (docs/weights.md).
# AP is the COCO val2017 box AP in each release's README (SenseTime's: the official
# Deformable DETR README's, which those Hub conversions come from).
ENTRIES: list[ZooEntry] = [
    _detr("detr-r50", "R50", 42.0, 159, "detr-r50-e632da11.pth"),
    _detr("detr-r50-dc5", "R50-DC5", 43.3, 159, "detr-r50-dc5-f0fb7ef5.pth"),
    _detr("detr-r101", "R101", 43.5, 232, "detr-r101-2c7b67e5.pth"),
    _detr("detr-r101-dc5", "R101-DC5", 44.9, 232, "detr-r101-dc5-a2e86def.pth"),
    _conditional("conditional-r50", "R50", 41.0, "ConditionalDETR_r50_epoch50.pth"),
    _conditional("conditional-r50-dc5", "R50-DC5", 43.7, "ConditionalDETR_r50dc5_epoch50.pth"),
    _conditional("conditional-r101", "R101", 42.8, "ConditionalDETR_r101_epoch50.pth"),
    _conditional("conditional-r101-dc5", "R101-DC5", 45.0,
                 "ConditionalDETR_r101dc5_epoch50.pth"),
    ZooEntry("conditional-r50-hf", "conditional", "R50", 41.0,
             hf="microsoft/conditional-detr-resnet-50"),
    ZooEntry("deformable-r50", "deformable", "R50", 44.5, hf="SenseTime/deformable-detr"),
    ZooEntry("deformable-r50-refine", "deformable", "R50", 46.2,
             hf="SenseTime/deformable-detr-with-box-refine", note="iterative box refinement"),
    ZooEntry("deformable-r50-two-stage", "deformable", "R50", 46.9,
             hf="SenseTime/deformable-detr-with-box-refine-two-stage",
             note="box refinement and two-stage"),
    ZooEntry("deformable-r50-ss", "deformable", "R50", 39.4,
             hf="SenseTime/deformable-detr-single-scale", note="single scale"),
    ZooEntry("deformable-r50-ss-dc5", "deformable", "R50-DC5", 41.5,
             hf="SenseTime/deformable-detr-single-scale-dc5", note="single scale"),
    # Sparse R-CNN's README links a Google Drive folder and a GitHub release; the release
    # asset URL of r50_300pro is confirmed (by code that downloads it), the others are not
    ZooEntry("sparse-rcnn-r50-300", "sparse-rcnn", "R50-FPN", 45.0,
             url="https://github.com/PeizeSun/SparseR-CNN/releases/download/v0.1/"
                 "r50_300pro_3x_model.pth", file="r50_300pro_3x_model.pth",
             note="300 proposals"),
    _manual("sparse-rcnn-r50-100", "sparse-rcnn", "R50-FPN", 42.8, _SPARSE,
             "r50_100pro_3x_model.pth", "100 proposals; also in " + _SPARSE_DRIVE),
    _manual("sparse-rcnn-r101-100", "sparse-rcnn", "R101-FPN", 44.1, _SPARSE,
             "r101_100pro_3x_model.pth", "100 proposals; also in " + _SPARSE_DRIVE),
    _manual("sparse-rcnn-r101-300", "sparse-rcnn", "R101-FPN", 46.4, _SPARSE,
             "sparse-rcnn-r101-300.pth", "300 proposals; the release's file name is not "
             "known here: save it under this name; also in " + _SPARSE_DRIVE),
    # Anchor DETR: Google Drive only (and Baidu); file names not published, so qdet names
    # them (a DC5 name must say dc5: dilation leaves no trace in the weights)
    _manual("anchor-r50", "anchor", "R50", 42.1, _ANCHOR, "anchor-r50.pth",
             "Google Drive (AnchorDETR-C5, R50)"),
    _manual("anchor-r50-dc5", "anchor", "R50-DC5", 44.3, _ANCHOR, "anchor-r50-dc5.pth",
             "Google Drive (AnchorDETR-DC5, R50)"),
    _manual("anchor-r101", "anchor", "R101", 43.5, _ANCHOR, "anchor-r101.pth",
             "Google Drive (AnchorDETR-C5, R101)"),
    _manual("anchor-r101-dc5", "anchor", "R101-DC5", 45.1, _ANCHOR, "anchor-r101-dc5.pth",
             "Google Drive (AnchorDETR-DC5, R101)"),
    # DINO: the official weights are on Google Drive only (file names from the README);
    # detrex trained its own, released as direct downloads (its layout, 80 classes)
    _manual("dino-r50", "dino", "R50", 49.0, _DINO, "checkpoint0011_4scale.pth",
            "12 epochs, 4 scales; Google Drive (the README's model zoo)"),
    _manual("dino-r50-5scale", "dino", "R50", 49.4, _DINO, "checkpoint0011_5scale.pth",
            "12 epochs, 5 scales; Google Drive (the README's model zoo)"),
    _detrex("dino-r50-detrex", "R50", 49.2, "v0.2.0", "dino_r50_4scale_12ep_49_2AP.pth",
            "detrex's training, 12 epochs, 4 scales"),
    _detrex("dino-r50-5scale-detrex", "R50", 49.6, "v0.2.1", "dino_r50_5scale_12ep.pth",
            "detrex's training, 12 epochs, 5 scales"),
    _detrex("dino-r50-24ep-detrex", "R50", 50.6, "v0.1.1", "dino_r50_4scale_24ep.pth",
            "detrex's training, 24 epochs, 4 scales"),
]
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


def _put_by_hand(dest: Path) -> str:
    return f"download it where there is network access and put it at {dest}"


def download(url: str, dest: Path, sha256: str | None = None, size: int | None = None,
             progress: Callable[[int, int | None], None] | None = None,
             timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically: a temporary file beside ``dest``, renamed
    only when the byte count matches what the server announced and ``size``, and the
    sha256 starts with ``sha256``; anything else deletes it and raises :class:`ZooError`.
    ``progress(done, total)`` is called as bytes arrive."""
    digest, done = hashlib.sha256(), 0
    with atomic_open(dest, "wb") as f:   # renamed over dest only if nothing below raises
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
            raise ZooError(f"cannot download {url} ({reason}); {_put_by_hand(dest)}"
                           ) from None
        expected = [n for n in (announced and int(announced), size) if n]
        if any(done != n for n in expected):
            raise ZooError(f"download of {url} stopped after {done} of {expected[0]} bytes "
                           f"(nothing was kept); run again, or {_put_by_hand(dest)}")
        got = digest.hexdigest()
        if sha256 and not got.startswith(sha256):
            raise ZooError(f"{url}: checksum mismatch (sha256 {got[:len(sha256)]}..., expected "
                           f"{sha256}...), the file was deleted; run again, or "
                           f"{_put_by_hand(dest)}")
    return dest


def download_with_bar(url: str, dest: Path, sha256: str | None = None,
                      size: int | None = None) -> Path:
    """:func:`download` with a progress bar on the terminal (stderr), shown once the server
    answers."""
    from ..common.terminal import download_bar

    bar = download_bar()
    task = None

    def progress(done: int, total: int | None) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(dest.name, total=total)
        bar.update(task, completed=done, total=total)

    try:
        return download(url, dest, sha256, size, progress)
    finally:
        if task is not None:
            bar.stop()


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
    return download_with_bar(entry.url, dest, entry.sha256)


# -------------------------------------------------------------------- Hugging Face Hub

HF_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_folder(repo_id: str, offline: bool = False) -> Path | None:
    """The local folder (config.json + weights) of Hub model ``repo_id`` in huggingface_hub's
    cache, downloading what is missing; with ``offline``, only what is cached (None if not).
    Raises :class:`ZooError` with what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def get(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, local_files_only=offline))

    by_hand = ("run once with network access (or HF_HUB_OFFLINE unset), or download the "
               "repository's config.json and model.safetensors into a folder and pass its "
               "path")
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
