"""`qdet predict` inputs (issue 18): folders (recursive, non-images skipped and counted),
glob patterns, unreadable and over-large images (said, the others still done), `-` and
URLs (refused in one line)."""
import json

import pytest
from PIL import Image
from test_data_errors import huge_png
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.models.registry import build_model
from qdet.weights.checkpoint import model_checkpoint, save_checkpoint

from conftest import TINY


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A tiny random model's checkpoint and a folder of photos, in the working directory."""
    model = build_model("detr", TINY["detr"])
    model.category_ids, model.class_names = [1, 2, 3, 4, 5], list("abcde")
    model.preprocess = {"size": 32, "max_size": 64}
    save_checkpoint(tmp_path / "w.pt", model_checkpoint(model))
    photos = tmp_path / "photos"
    (photos / "sub" / "deep").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "sub/deep/a.png"):
        Image.new("RGB", (40, 30), (200, 100, 50)).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    (photos / "sub" / ".DS_Store").write_bytes(b"\0\1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def predict(*args):
    return CliRunner().invoke(app, ["predict", *args, "--weights", "w.pt", "--threshold", "0",
                                    "--out", "out"])


def test_a_folder_is_searched_recursively(place):
    r = predict("photos")
    assert r.exit_code == 0, r.output
    assert "skipped 2 file(s) in photos that are not images or videos" in r.output
    done = json.loads((place / "out" / "predictions.json").read_text())
    assert [d["image"] for d in done] == ["photos/a.png", "photos/sub/b.jpg",
                                          "photos/sub/deep/a.png"]
    assert sorted(p.name for p in (place / "out").glob("*.png")) == [
        "a-2_pred.png", "a_pred.png", "b_pred.png"]   # two a.png, neither drawing lost


def test_a_quoted_glob_and_repeats(place):
    r = predict("photos/**/*.png", "photos/a.png")
    assert r.exit_code == 0, r.output
    done = json.loads((place / "out" / "predictions.json").read_text())
    assert [d["image"] for d in done] == ["photos/a.png", "photos/sub/deep/a.png"]
    r = predict("photos/*.gif")
    assert r.exit_code == 1 and r.output.strip() == "error: no file matches 'photos/*.gif'"


def test_unreadable_and_huge_images_are_said_and_the_rest_done(place):
    (place / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    huge_png(place / "photos" / "huge.png")
    r = predict("photos")
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, r.output
    assert errors[0].startswith("error: image photos/broken.jpg cannot be read: cannot "
                                "identify image file") and errors[0].endswith("; skipped")
    assert errors[1].startswith("error: image photos/huge.png is too large: ") and \
        "qdet opens at most 89,478,485 pixels" in errors[1]
    assert errors[2] == "error: 2 of 5 images could not be read (above); the other 3 are done"
    done = json.loads((place / "out" / "predictions.json").read_text())
    assert len(done) == 3 and "Traceback" not in r.output


@pytest.mark.parametrize("arg,says", [
    ("-", "error: '-': reading an image from standard input is not supported; save it to a "
          "file and pass its path"),
    ("https://example.com/cat.jpg", "error: 'https://example.com/cat.jpg' is a URL; qdet "
                                    "predict reads local files only: download the image first"),
    ("nope.jpg", "error: image nope.jpg not found"),
])
def test_stdin_urls_and_missing_files(place, arg, says):
    r = predict("photos/a.png", arg)
    assert r.exit_code == 1 and r.output.strip() == says, r.output


def test_a_folder_without_images(place):
    (place / "empty").mkdir()
    (place / "empty" / "readme.md").write_text("#")
    r = predict("empty")
    assert r.exit_code == 1
    assert r.output.strip().endswith("error: folder empty holds no image or video files "
                                     "(1 other file(s))"), r.output
