"""Detection on a video file (``qdet predict clip.mp4``): frames decoded, run through the model
in batches, drawn as images are, and encoded to a new video of the same frame count, size and
rate, with one JSON line of detections per frame the model ran on.

Three threads, so that on a CPU the model is the bottleneck: one decodes frames
(``qdet.data.video.VideoReader``) into a bounded queue, the caller's thread batches them
through the model, one draws and encodes. PyAV and libx264 do their work outside the GIL
(and torch its own), so the three overlap; the queues hold a few batches, so memory stays
flat however long the video. ``stride`` runs the model on every N-th frame and draws the
others with the last detections (the frames in between wait for it: a batch of B model
frames holds up to B x N frames).

A video cut short keeps its frames: they are written, and the result says where reading
stopped.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..common.files import atomic_open, atomic_path
from ..data.errors import DataError
from ..data.video import Frame, VideoReader, VideoWriter
from ..engine.predict import detect
from .draw import draw_detections

_END = object()     # the end of a queue's stream


@dataclass
class VideoResult:
    """What :func:`predict_video` did: frames read (and written), frames the model ran on,
    seconds, the codec written, and where reading stopped early (None: the whole video)."""
    video: Path
    jsonl: Path
    frames: int
    ran: int
    seconds: float
    codec: str
    stopped: str | None


class _Pipe:
    """A bounded queue between two threads that gives up when either side has stopped
    (``stop`` set by whoever fails), instead of waiting forever for a dead peer."""

    def __init__(self, size: int, stop: threading.Event):
        self.q: queue.Queue = queue.Queue(maxsize=size)
        self.stop = stop

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def get(self):
        while not self.stop.is_set():
            try:
                return self.q.get(timeout=0.05)
            except queue.Empty:
                pass
        return _END


class _Thread(threading.Thread):
    """A thread that keeps the exception its work raised (for the caller to raise) and
    sets ``stop`` when it fails, so that the other threads stop waiting for it."""

    def __init__(self, work: Callable[[], None], name: str, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.work, self.stop, self.error = work, stop, None

    def run(self):
        try:
            self.work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self.error = e
            self.stop.set()


def predict_video(model, path: str | Path, out_video: str | Path, out_jsonl: str | Path,
                  threshold: float = 0.5, batch: int = 4, stride: int = 1,
                  bf16: bool = False, progress: Callable[[int], None] | None = None,
                  model_run: bool = True) -> VideoResult:
    """Run ``model`` on the video at ``path``; write the drawn frames to ``out_video`` (MP4)
    and, per frame the model ran on, ``{"frame", "time", "detections"}`` to ``out_jsonl``
    (JSON Lines; ``time`` in seconds, ``detections`` as :func:`qdet.detect` gives them).
    ``progress(frames_done)`` is called per frame written. ``model_run=False`` runs no model
    and draws nothing (to measure decoding and encoding alone). Raises DataError when not a
    single frame can be read (nothing is written then)."""
    if batch < 1 or stride < 1:
        raise ValueError(f"batch and stride must be at least 1, got {batch} and {stride}")
    start = time.perf_counter()
    stop = threading.Event()
    frames, drawn = _Pipe(2 * batch * stride, stop), _Pipe(2 * batch * stride, stop)
    with VideoReader(path) as reader, atomic_path(out_video) as tmp_video, \
            atomic_open(out_jsonl, "w", encoding="utf-8") as jsonl:
        writer = VideoWriter(tmp_video, reader.width, reader.height, reader.rate)

        def decode():
            for frame in reader:
                if not frames.put(frame):
                    return
            frames.put(_END)

        def encode():
            done = 0
            while (item := drawn.get()) is not _END:
                frame, dets, ran = item
                writer.write(draw_detections(frame.image, dets, enlarge_small=False)
                             if model_run else frame.image)
                if ran:
                    jsonl.write(json.dumps({"frame": frame.index, "time": round(frame.time, 6),
                                            "detections": dets}) + "\n")
                done += 1
                if progress:
                    progress(done)

        threads = [_Thread(decode, "decoder", stop), _Thread(encode, "encoder", stop)]
        for t in threads:
            t.start()
        try:
            ran = _run_model(model, frames, drawn, threshold, batch, stride, bf16, model_run)
        except BaseException:
            stop.set()
            raise
        finally:
            for t in threads:
                t.join()
            writer.close()
        for t in threads:
            if t.error is not None:
                raise t.error
        if reader.read == 0:
            raise DataError(reader.stopped.removesuffix("; the 0 frame(s) before are kept")
                            if reader.stopped else f"video {reader.path} holds no frame")
    return VideoResult(Path(out_video), Path(out_jsonl), reader.read, ran,
                       time.perf_counter() - start, writer.codec, reader.stopped)


def _run_model(model, frames: _Pipe, drawn: _Pipe, threshold: float, batch: int, stride: int,
               bf16: bool, model_run: bool) -> int:
    """The caller's thread: frames in, batches of every ``stride``-th frame through the
    model, every frame out with the last detections; returns how many frames ran."""
    pending: list[Frame] = []
    last: list[dict] = []
    ran, done = 0, False
    while not done:
        item = frames.get()
        done = item is _END
        if not done:
            pending.append(item)
        chosen = [f for f in pending if f.index % stride == 0]
        if len(chosen) < batch and not done:
            continue
        found = detect(model, [f.image for f in chosen], threshold, len(chosen), bf16) \
            if model_run and chosen else [[] for _ in chosen]
        by_index = dict(zip((f.index for f in chosen), found))
        ran += len(chosen)
        for f in pending:
            last = by_index.get(f.index, last)
            if not drawn.put((f, last, f.index in by_index)):
                return ran
        pending = []
    drawn.put(_END)
    return ran
