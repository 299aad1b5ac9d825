"""Reading images safely, and the normalization every model's input gets.

An image is opened header-first and refused before decoding when it is missing, a symlink to
nowhere, not an image, or over PIL's decompression-bomb limit; decoding errors (a JPEG cut
short) name the file too.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..common.files import atomic_path
from .errors import DataError

# the ImageNet statistics every backbone was trained with; the one place they are written
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 ``[3,H,W]`` in [0, 1], normalized with ImageNet mean/std."""
    return TF.normalize(TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True),
                        IMAGENET_MEAN, IMAGENET_STD)


def denormalize_image(x: torch.Tensor) -> Image.Image:
    """A normalized ``[3,H,W]`` tensor back to a PIL RGB image (to draw on)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = ((x.detach().float().cpu() * std + mean).clamp(0, 1) * 255).byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def max_pixels() -> int:
    """The largest image qdet opens, in pixels: PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 by default, about 9459 x 9459). The models
    resize to at most 1333 px anyway; raise the PIL value to open larger images."""
    return Image.MAX_IMAGE_PIXELS or 2 ** 63


@contextlib.contextmanager
def bomb_guard():
    """PIL warns about images over its pixel limit and refuses those over twice it; qdet
    refuses at the limit, so the warning becomes the error :func:`open_image` reports.
    Enter it in the main thread (warning filters are global), around threads too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_image(path: Path) -> Image.Image:
    """``Image.open`` (header only) or a DataError saying why not: missing, a symlink to
    nowhere, a folder, not an image, or over :func:`max_pixels` (use under
    :func:`bomb_guard`, or PIL also prints its warning)."""
    path = Path(path)
    try:
        if not path.exists():
            if path.is_symlink():
                raise DataError(f"image {path} is a symlink to nowhere "
                                f"({os.readlink(path)!r} does not exist)")
            raise DataError(f"image {path} not found")
        if not path.is_file():
            raise DataError(f"image {path} is not a file")
        im = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} is too large: {e} (qdet opens at most {max_pixels():,} "
                        "pixels, PIL's decompression-bomb guard; downscale it)") from None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"image {path} cannot be read: {error_reason(e)}") from None
    if im.width * im.height > max_pixels():
        im.close()
        raise DataError(f"image {path} is too large: {im.width} x {im.height} pixels, over "
                        f"qdet's limit of {max_pixels():,} (PIL's decompression-bomb guard); "
                        "downscale it")
    return im


def load_image(path: Path) -> Image.Image:
    """The image at ``path`` as RGB, decoded, or a DataError naming the file."""
    with bomb_guard():
        im = open_image(path)
    try:
        with im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data shows only when decoded
        raise DataError(f"image {path} cannot be read: {error_reason(e)}") from None


def error_reason(e: Exception) -> str:
    text = " ".join(str(e).split()) or "no details"
    return text if isinstance(e, OSError) else f"{type(e).__name__}: {text}"


def save_image(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``img`` atomically (``qdet.common.files``), in the format its suffix names."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: no image format has the suffix {path.suffix!r}")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)
    return path
