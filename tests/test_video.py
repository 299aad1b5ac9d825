"""`qdet predict` on videos (issue 33), end to end on clips this test writes with PyAV: the
drawn video keeps frame count, size and rate; detections are JSON Lines with frame index and
time; --stride and --batch; a cut or fake video keeps what was read and says where it
stopped; without PyAV, one line."""
import json
import sys
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.models.registry import build_model
from qdet.weights.checkpoint import model_checkpoint, save_checkpoint

from conftest import TINY

av = pytest.importorskip("av")


def write_clip(path, frames=12, size=(64, 48), rate=10, codec="libx264", faststart=False):
    """A clip of ``frames`` random frames at ``rate`` fps, as a camera app would write it."""
    out = av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {})
    stream = out.add_stream(codec, rate=Fraction(rate))
    stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
    rng = np.random.default_rng(0)
    for _ in range(frames):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def video_facts(path):
    """(frames decoded, width, height, average rate, codec) of a video file."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        cc = s.codec_context
        return n, cc.width, cc.height, s.average_rate, cc.name


@pytest.fixture
def place(tmp_path, monkeypatch):
    model = build_model("detr", TINY["detr"])
    model.category_ids, model.class_names = [1, 2, 3, 4, 5], list("abcde")
    model.preprocess = {"size": 32, "max_size": 64}
    save_checkpoint(tmp_path / "w.pt", model_checkpoint(model))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def predict(*args):
    return CliRunner().invoke(app, ["predict", *args, "--weights", "w.pt", "--threshold", "0",
                                    "--out", "out"])


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_clip_end_to_end(place):
    write_clip(place / "clip.mp4")
    r = predict("clip.mp4")
    assert r.exit_code == 0, r.output
    assert video_facts(place / "out/clip.mp4") == (12, 64, 48, 10, "h264")
    lines = jsonl(place / "out/clip.jsonl")
    assert [d["frame"] for d in lines] == list(range(12))
    assert [d["time"] for d in lines] == pytest.approx([i / 10 for i in range(12)])
    assert all(len(d["detections"]) == 6 for d in lines)             # 6 queries, threshold 0
    assert {"label", "name", "category_id", "score", "box"} == set(lines[0]["detections"][0])
    assert "clip.mp4: 12 frames (model on 12)" in r.output and " fps -> out/clip.mp4 (libx264)" \
        in r.output
    assert not (place / "out/predictions.json").exists()             # no images were given


def test_stride_and_batch_run_every_nth_frame_and_draw_all(place):
    write_clip(place / "clip.mp4", frames=11)
    r = predict("clip.mp4", "--stride", "3", "--batch", "2")
    assert r.exit_code == 0, r.output
    assert video_facts(place / "out/clip.mp4")[0] == 11
    assert [d["frame"] for d in jsonl(place / "out/clip.jsonl")] == [0, 3, 6, 9]
    assert "11 frames (model on 4)" in r.output


def test_a_cut_video_keeps_its_frames_and_says_where_it_stopped(place):
    write_clip(place / "whole.mp4", frames=24, faststart=True)
    data = (place / "whole.mp4").read_bytes()
    (place / "cut.mp4").write_bytes(data[:len(data) // 2])
    r = predict("cut.mp4")
    assert r.exit_code == 1, r.output
    kept = video_facts(place / "out/cut.mp4")[0]
    assert 0 < kept < 24 and len(jsonl(place / "out/cut.jsonl")) == kept
    stopped = [line for line in r.output.splitlines() if "stopped at frame" in line]
    assert stopped == [f"error: video cut.mp4: stopped at frame {kept} ({kept / 10:.2f} s): "
                       + stopped[0].split(" s): ", 1)[1]]
    assert stopped[0].endswith(f"the {kept} frame(s) before are kept")


def test_fake_videos_and_a_folder_mixing_images_and_videos(place):
    (place / "mixed").mkdir()
    write_clip(place / "mixed" / "clip.mov")
    Image.new("RGB", (40, 30)).save(place / "mixed" / "photo.png")
    (place / "mixed" / "fake.mp4").write_text("not a video")
    (place / "mixed" / "notes.txt").write_text("skipped")
    r = predict("mixed")
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: video mixed/fake.mp4 cannot be read: Invalid data "
                                "found when processing input") and errors[0].endswith("; skipped")
    assert errors[1] == "error: 1 of 3 files could not be read, or not to the end (above); " \
        "the other 2 are done"
    assert "skipped 1 file(s) in mixed that are not images or videos" in r.output
    assert video_facts(place / "out/clip.mp4")[:3] == (12, 64, 48)
    assert (place / "out/photo_pred.png").is_file() and not (place / "out/fake.mp4").exists()


def test_odd_sizes_are_kept_with_mpeg4_and_inputs_never_overwritten(place):
    write_clip(place / "odd.avi", frames=5, size=(65, 49), codec="mpeg4", rate=25)
    (place / "out").mkdir()
    write_clip(place / "out" / "odd.mp4", frames=3)
    r = predict("odd.avi", "out/odd.mp4")
    assert r.exit_code == 0, r.output
    assert video_facts(place / "out/odd-2.mp4") == (5, 65, 49, 25, "mpeg4")
    assert video_facts(place / "out/odd-3.mp4")[:3] == (3, 64, 48)
    assert video_facts(place / "out/odd.mp4")[0] == 3                 # the input, untouched


def test_without_pyav_one_line_says_how_to_install_it(place, monkeypatch):
    write_clip(place / "clip.mp4", frames=2)
    monkeypatch.setitem(sys.modules, "av", None)            # import av raises ImportError
    r = predict("clip.mp4")
    assert r.exit_code == 1 and r.output.strip() == (
        'error: reading videos needs PyAV: pip install "qdet[video]" (or pip install av)')
