"""``qdet predict``: detections drawn on images and videos, in a table and in JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..common.files import write_atomic
from ..common.terminal import box_text, console, err, narrow_table
from .common import WEIGHTS_HELP, Device, fail, find_weights, load_model, pick_device


def say_error(message: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def predict(
    image: Annotated[list[str], typer.Argument(
        help="Image and video files, folders (searched recursively; other files are "
             "skipped and counted) or quoted glob patterns (\"shots/**/*.jpg\").")],
    weights: Annotated[Optional[str], typer.Option(help="Weights: " + WEIGHTS_HELP + "; "
                                                   "default: best.pt of the most recent run "
                                                   "under ./runs.")] = None,
    threshold: Annotated[float, typer.Option(help="Minimum score to report.")] = 0.5,
    out: Annotated[Path, typer.Option(help="Folder for the drawn images and videos, "
                                      "predictions.json and a .jsonl per video.")
                   ] = Path("predictions"),
    batch: Annotated[int, typer.Option(help="Video frames per model call.")] = 4,
    stride: Annotated[int, typer.Option(help="Run the model on every N-th video frame; the "
                                        "others are drawn with the last detections.",
                                        metavar="N")] = 1,
    device: Device = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast.")] = False,
):
    """Detect objects in images and videos: draws boxes, prints a table (a line per video),
    writes JSON (JSON Lines per video: frame index, time, detections). A video is written
    to OUT/NAME.mp4 with its frame count, size and rate (needs PyAV: pip install
    "qdet[video]"). A file that cannot be read (or an image over PIL's 89.5-million-pixel
    limit) is reported and skipped; a video cut short keeps its frames and says where it
    stopped; the others are still done, and the exit code is then 1."""
    from ..common.terminal import print_table
    from ..data.errors import DataError
    from ..data.images import load_image, save_image
    from ..engine.predict import find_images, is_video, output_names, predict_files
    from ..tools.draw import draw_detections

    if batch < 1 or stride < 1:
        fail(f"--batch and --stride must be at least 1, got {batch} and {stride}")
    try:
        files, skipped = find_images(image)
    except DataError as e:
        fail(str(e))
    for folder, n in skipped.items():
        err.print(Text(f"skipped {n} file(s) in {folder} that are not images or videos"),
                  soft_wrap=True)
    named = {Path(a) for a in image}
    videos = [f for f in files if is_video(f, named=f in named)]
    images = [f for f in files if f not in set(videos)]
    if videos:
        from ..data.video import require_av

        try:
            require_av()
        except DataError as e:
            fail(str(e))
    model = load_model(find_weights(weights), pick_device(device), bf16=bf16)
    failed = []

    def unreadable(path: Path, message: str):
        failed.append(path)
        say_error(f"{message}; skipped")

    results = predict_files(model, images, threshold, bf16=bf16, on_error=unreadable)
    saved_as = output_names([Path(r["image"]) for r in results])
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        path = Path(r["image"])
        save_image(draw_detections(load_image(path), r["detections"]), out / saved_as[path])
    if images:
        print_table(console, f"detections (score >= {threshold})", detections_table(results))
        write_atomic(out / "predictions.json", json.dumps(results, indent=1))
    to_video = video_names(videos, out, files)
    for v in videos:
        predict_one_video(model, v, to_video[v], threshold, batch, stride, bf16, failed)
    drawn = " and ".join(w for w, some in (("images and predictions.json", images),
                                           ("videos", videos)) if some)
    console.print(f"drawn {drawn} in {escape(str(out))}/")
    if failed:
        what = "files could not be read, or not to the end" if videos else \
            "images could not be read"
        fail(f"{len(failed)} of {len(files)} {what} (above); the other "
             f"{len(files) - len(failed)} are done")


def video_names(videos: list[Path], out: Path, inputs: list[Path]) -> dict[Path, Path]:
    """``OUT/NAME.mp4`` per video (its JSON Lines beside it, ``NAME.jsonl``), with ``-2``,
    ``-3``, ... where two videos share a name or the name is one of the inputs (``qdet
    predict out/clip.mp4`` must not overwrite what it reads)."""
    taken = {p.resolve() for p in inputs}
    names = {}
    for video in videos:
        stem, k = video.stem, 2
        while (out / f"{stem}.mp4").resolve() in taken:
            stem, k = f"{video.stem}-{k}", k + 1
        names[video] = out / f"{stem}.mp4"
        taken.add(names[video].resolve())
    return names


def predict_one_video(model, video: Path, to_video: Path, threshold: float, batch: int,
                      stride: int, bf16: bool, failed: list) -> None:
    """One video through :func:`qdet.tools.video.predict_video` with a progress bar (frames
    per second), and a line saying what was written; a video that cannot be read at all is
    said and skipped, one cut short is written and said, both counted in ``failed``."""
    from ..common.terminal import progress_bar
    from ..data.errors import DataError
    from ..tools.video import predict_video

    to_jsonl = to_video.with_suffix(".jsonl")
    with progress_bar() as bar:
        task = bar.add_task(video.name, total=None, info="")
        start = bar.get_time()

        def advance(done: int):
            fps = done / max(bar.get_time() - start, 1e-9)
            bar.update(task, completed=done, info=f"{fps:.1f} fps")
        try:
            from ..data.video import VideoReader

            with VideoReader(video) as probe:
                bar.update(task, total=probe.frames)
            r = predict_video(model, video, to_video, to_jsonl, threshold, batch, stride, bf16,
                              progress=advance)
        except DataError as e:
            failed.append(video)
            say_error(f"{e}; skipped")
            return
    if r.stopped:
        failed.append(video)
        say_error(r.stopped)
    console.print(Text(f"{video}: {r.frames} frames (model on {r.ran}) in {r.seconds:.1f} s, "
                       f"{r.frames / max(r.seconds, 1e-9):.1f} fps -> {r.video} ({r.codec}), "
                       f"{r.jsonl}"), soft_wrap=True)


def detections_table(results: list[dict]) -> Table:
    """``qdet predict``'s detections (``qdet.engine.predict.predict_files``), one line each; an
    image's name on its first line only, folded rather than cut when long."""
    table = narrow_table("boxes: x0 y0 x1 y1 in pixels")
    table.add_column("image", overflow="fold")
    table.add_column("class")
    for col in ("score", "box"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        name = Path(r["image"]).name
        if not r["detections"]:
            table.add_row(name, "-", "-", "-")
        for k, d in enumerate(r["detections"]):
            table.add_row(name if k == 0 else "", d["name"], f"{d['score']:.2f}",
                          box_text(d["box"]))
    return table
