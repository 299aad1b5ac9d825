"""Drawing detections on images: boxes with a label tag, one colour per class, small images
enlarged first so that labels do not cover the objects (``qdet predict``, ``qdet
match-debug``; video frames keep their size)."""
from __future__ import annotations

import colorsys

from PIL import Image, ImageDraw, ImageFont


def colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def font_for(img: Image.Image):
    size = max(10, min(img.width, img.height) // 40)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_box(draw: ImageDraw.ImageDraw, box, text: str, col, font, width: int = 2,
             below: bool = False) -> None:
    """A box with its label on a filled tag above it (or below, ``below=True``)."""
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1, y1], outline=col, width=width)
    if text:
        tb = draw.textbbox((x0, y0), text, font=font)
        th = tb[3] - tb[1]
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0
        if below:
            ty = y1 + 2 if y1 + th + 4 <= draw.im.size[1] else y1 - th - 4
        tb = draw.textbbox((x0 + 2, ty + 1), text, font=font)
        draw.rectangle([tb[0] - 2, tb[1] - 1, tb[2] + 2, tb[3] + 1], fill=col)
        draw.text((x0 + 2, ty + 1), text, fill=(0, 0, 0), font=font)


def enlarge(img: Image.Image, min_side: int = 512) -> tuple[Image.Image, int]:
    """An RGB copy of ``img``, scaled up by a whole factor ``k`` (nearest neighbour) when its
    longer side is under ``min_side``, so that labels drawn on it are legible without
    covering small objects (the built-in data's 128 px images); returns ``(image, k)``."""
    img = img.convert("RGB")
    if max(img.size) >= min_side:
        return img.copy(), 1
    k = -(-min_side // max(img.size))
    return img.resize((img.width * k, img.height * k), Image.NEAREST), k


def draw_detections(img: Image.Image, detections: list[dict],
                    enlarge_small: bool = True) -> Image.Image:
    """A copy of ``img`` (enlarged when small, see :func:`enlarge`, unless
    ``enlarge_small`` is False: a video's frames keep the video's size) with each
    detection's box, name and score."""
    img, k = enlarge(img) if enlarge_small else (img.convert("RGB"), 1)
    draw, font = ImageDraw.Draw(img), font_for(img)
    width = max(2, min(img.width, img.height) // 200)
    for d in detections:
        draw_box(draw, [v * k for v in d["box"]], f"{d['name']} {d['score']:.2f}",
                 colour(d["label"]), font, width)
    return img
