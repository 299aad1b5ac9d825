"""``qdet bench video``: frames per second of ``qdet predict`` on a video, against decoding
alone, decoding and encoding without a model, and the model alone on the same frames held in
memory, all measured in the same process on a clip written here (moving shapes, H.264).

The question it answers: is the model the bottleneck? The pipeline (three threads:
``qdet.tools.video``) should run at close to the model-alone rate; the ratio says how close.
On a CPU, decoding and encoding take cores from the model (about 8 ms a 640 x 480 frame on
this 2-core machine), so a small model cannot reach its rate alone; a large one nearly does.
Models run with random weights (speed does not depend on them): the built-in preset's model
of an architecture (``shapes``, at its 128 px input) and DETR-R50 (the paper's model, frames
in at 640 x 480, not resized). Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..blocks.fast import optimize_for_inference
from ..data.video import VideoReader, require_av
from ..engine.predict import detect
from ..engine.presets import preset
from ..models.registry import build_model
from .video import predict_video


def write_test_clip(path: Path, frames: int, size: tuple[int, int], rate: int = 30) -> Path:
    """``frames`` frames of a few coloured boxes moving over a gradient, libx264 (the kind of
    content a camera gives the encoder: smooth, with edges), ``size`` = (width, height)."""
    av = require_av()
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    background = np.stack([xs * 255 // max(w - 1, 1), ys * 255 // max(h - 1, 1),
                           np.full_like(xs, 96)], -1).astype(np.uint8)
    rng = np.random.default_rng(0)
    boxes = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(-4, 4), rng.uniform(-4, 4),
              rng.integers(0, 255, 3)) for _ in range(5)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(rate))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = background.copy()
            for x, y, dx, dy, colour in boxes:
                x0, y0 = int((x + dx * i) % w), int((y + dy * i) % h)
                img[y0:y0 + h // 6, x0:x0 + w // 6] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def bench_models(arch: str) -> list[tuple[str, torch.nn.Module]]:
    """The two models measured, on the inference fast path as ``qdet predict`` runs them:
    ``arch``'s built-in preset (128 px input) and DETR-R50 (the paper's configuration,
    640 px: frames of 640 x 480 go in as they are)."""
    small = build_model(arch, {**preset(arch, "shapes").model, "num_classes": 5}).eval()
    small.preprocess = {"size": 128, "max_size": None}
    r50 = build_model("detr", {"num_classes": 91}).eval()
    r50.preprocess = {"size": 640, "max_size": 640}
    for m in (small, r50):
        m.class_names = [f"class_{i}" for i in range(m.config.num_classes)]
        m.category_ids = list(range(1, m.config.num_classes + 1))
    # the fast path, as `qdet predict` loads every model (qdet.load(fast=True))
    return [(f"{arch} (shapes preset, 128 px)", optimize_for_inference(small)),
            ("detr-r50 (640 px)", optimize_for_inference(r50))]


def bench_video(arch: str = "conditional", frames: int = 120, size: tuple[int, int] = (640, 480),
                batch: int = 4, precisions: tuple[str, ...] = ("fp32", "bf16"),
                models: list | None = None, repeat: int = 1) -> dict:
    """``{"frames", "size", "decode_fps", "decode_encode_fps", "rows"}``, a row per model and
    precision: the model alone on frames in memory (``model_fps``), the whole pipeline
    (``pipeline_fps``) and their ratio (1: the model is the bottleneck). With ``repeat``,
    the two alternate and each keeps its best run (a shared machine's noise)."""
    models = bench_models(arch) if models is None else models
    with tempfile.TemporaryDirectory(prefix="qdet-bench-video-") as tmp:
        clip = write_test_clip(Path(tmp) / "clip.mp4", frames, size)
        t0 = time.perf_counter()
        with VideoReader(clip) as reader:
            images = [f.image for f in reader]
        decode_fps = frames / (time.perf_counter() - t0)
        plain = predict_video(models[0][1], clip, Path(tmp) / "copy.mp4", Path(tmp) / "c.jsonl",
                              model_run=False)
        rows = []
        for name, model in models:
            for precision in precisions:
                bf16 = precision == "bf16"
                detect(model, images[:batch], 0.5, batch, bf16)     # warm-up
                model_fps = pipeline_fps = 0.0
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    detect(model, images, 0.5, batch, bf16)
                    model_fps = max(model_fps, frames / (time.perf_counter() - t0))
                    run = predict_video(model, clip, Path(tmp) / "out.mp4",
                                        Path(tmp) / "out.jsonl", 0.5, batch, 1, bf16)
                    pipeline_fps = max(pipeline_fps, run.frames / run.seconds)
                rows.append({"model": name, "precision": precision, "model_fps": model_fps,
                             "pipeline_fps": pipeline_fps, "ratio": pipeline_fps / model_fps})
    return {"frames": frames, "size": list(size), "decode_fps": decode_fps,
            "decode_encode_fps": plain.frames / plain.seconds, "rows": rows}
