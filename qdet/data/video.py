"""Video files in and out, through PyAV (``pip install "qdet[video]"``, an optional extra; the
import happens on first use, and without it the one line says how to install it).

Reading keeps what it can: a file cut short, or with a broken packet, yields the frames
decoded before the break, and :attr:`VideoReader.stopped` says where and why, instead of an
exception that would lose them. Packets are decoded one by one for this (FFmpeg's
``decode()`` loop gives up at the first bad packet with the frames it buffered).

Writing: H.264 (libx264, yuv420p) in MP4 where the encoder exists and the frame size is
even (4:2:0 halves both sides), else MPEG-4 part 2, which every player reads and which takes
odd sizes; frame count, size and rate are the input's. The file is written under a
temporary name and renamed when done (``qdet.common.files``), so a killed run leaves no half
video behind.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

from PIL import Image

from .errors import DataError

# the names a folder search takes for videos (others may still be passed one by one)
VIDEO_SUFFIXES = frozenset((".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg",
                            ".wmv", ".flv", ".ts", ".mts", ".m2ts", ".3gp", ".ogv"))
# formats FFmpeg opens that hold one still picture: a JPEG named .mp4 is not a video
STILL_FORMATS = ("image2", "jpeg_pipe", "png_pipe", "bmp_pipe", "webp_pipe", "gif_pipe",
                 "tiff_pipe")
INSTALL = 'reading videos needs PyAV: pip install "qdet[video]" (or pip install av)'


def is_video_name(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def require_av():
    """The ``av`` module, or a DataError saying how to install it."""
    try:
        import av
    except ImportError:
        raise DataError(INSTALL) from None
    return av


def looks_like_video(path: Path) -> bool:
    """Whether PyAV (if installed) opens ``path`` as a moving picture: for a file named on
    the command line whose suffix is neither an image's nor a usual video's."""
    try:
        import av
    except ImportError:
        return False
    try:
        with av.open(str(path)) as c:
            return bool(c.streams.video) and c.format.name not in STILL_FORMATS
    except (av.FFmpegError, OSError):
        return False


@dataclass
class Frame:
    index: int          # 0-based, in decoding order
    time: float         # seconds from the start of the stream
    image: Image.Image  # RGB


class VideoReader:
    """The frames of a video file, in order. ``width``, ``height``, ``rate`` (a Fraction)
    and ``frames`` (the container's count, None when it stores none: mkv, webm) are known
    once open; after iterating, ``read`` is the number of frames yielded and ``stopped``
    None, or where and why reading stopped early."""

    def __init__(self, path: str | os.PathLike):
        av = require_av()
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"video {self.path} not found")
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as e:
            raise DataError(f"video {self.path} cannot be read: {_reason(e)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise DataError(f"video {self.path} has no video stream")
        # FFmpeg's default slice threads; frame threads ("AUTO") swallow a broken packet's
        # error and the frames decoded before it (measured: 58 of 60 kept, nothing said)
        self._stream = s = self._container.streams.video[0]
        self.width, self.height = s.codec_context.width, s.codec_context.height
        self.rate = Fraction(s.average_rate or s.guessed_rate or 25)
        self.frames = s.frames or None
        self.read, self.stopped = 0, None

    def __iter__(self) -> Iterator[Frame]:
        av = require_av()
        s = self._stream
        try:
            for packet in self._container.demux(s):
                try:
                    decoded = packet.decode()
                except av.FFmpegError as e:
                    yield from self._frames(self._flush(s))   # the frames it still holds
                    self._stop(e)
                    return
                yield from self._frames(decoded)
        except av.FFmpegError as e:      # demuxing: the container itself is cut
            self._stop(e)
            return
        if self.frames and self.read < self.frames:   # packets end early without an error
            self._stop(f"the file ends before the {self.frames} frames its header announces "
                       "(cut short?)")

    def _frames(self, decoded) -> Iterator[Frame]:
        for f in decoded:
            t = float(f.time) if f.time is not None else float(self.read / self.rate)
            yield Frame(self.read, t, f.to_image())
            self.read += 1

    @staticmethod
    def _flush(stream) -> list:
        """The frames a decoder still holds after a broken packet (H.264 keeps a few)."""
        try:
            return stream.decode(None)
        except Exception:  # noqa: BLE001 - nothing more to get from a broken stream
            return []

    def _stop(self, why: Exception | str) -> None:
        at = f"{float(self.read / self.rate):.2f} s"
        why = why if isinstance(why, str) else _reason(why)
        self.stopped = (f"video {self.path}: stopped at frame {self.read} ({at}): {why}; the "
                        f"{self.read} frame(s) before are kept")

    def close(self) -> None:
        self._container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split()) or type(e).__name__


def pick_codec(width: int, height: int) -> str:
    """libx264 for even sizes where the encoder exists, else mpeg4 (see the docstring)."""
    av = require_av()
    if width % 2 == 0 and height % 2 == 0 and "libx264" in av.codecs_available:
        return "libx264"
    return "mpeg4"


class VideoWriter:
    """Frames (PIL images of one size) encoded to ``path`` (an open temporary file's name,
    so the container format is given, not guessed from the name) at ``rate``."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, rate: Fraction,
                 container: str = "mp4"):
        av = require_av()
        self.codec = pick_codec(width, height)
        self._out = av.open(str(path), "w", format=container)
        self._stream = s = self._out.add_stream(self.codec, rate=Fraction(rate))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        # quality near-lossless to the eye, speed so that encoding stays behind the model
        s.options = {"crf": "20", "preset": "veryfast"} if self.codec == "libx264" else {}
        if self.codec == "mpeg4":
            s.codec_context.bit_rate = max(width * height * 4, 500_000)
        self._rate, self.written = Fraction(rate), 0
        self._av = av

    def write(self, image: Image.Image) -> None:
        frame = self._av.VideoFrame.from_image(image)
        frame.pts, frame.time_base = self.written, 1 / self._rate
        for packet in self._stream.encode(frame):
            self._out.mux(packet)
        self.written += 1

    def close(self) -> None:
        for packet in self._stream.encode():      # flush the encoder's delayed frames
            self._out.mux(packet)
        self._out.close()
