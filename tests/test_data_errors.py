"""Bad COCO input, case by case (issue 18): each one stops with one line that names the file,
the entry and what is wrong, printed verbatim by the CLI (brackets, NaN and unicode
included), or is accepted and trains."""
import json
import os
import struct
import zlib

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.data.coco import validate_coco
from qdet.data.datasets import CocoDataset, collate
from qdet.data.errors import DataError
from qdet.data.transforms import AugmentConfig


def write(tmp_path, images=None, annotations=None, categories=None, files=None, raw=None):
    """A small dataset (two 40x30 / 50x20 PNGs); any part replaced by the arguments."""
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    for name, size in (files if files is not None else {"a.png": (40, 30),
                                                        "b.png": (50, 20)}).items():
        Image.new("RGB", size, (90, 40, 10)).save(folder / name)
    data = {"images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30},
                       {"id": 9, "file_name": "b.png", "width": 50, "height": 20}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 5, 10, 10]},
                            {"id": 2, "image_id": 9, "category_id": 2, "bbox": [1, 2, 30, 9]}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    for key, value in (("images", images), ("annotations", annotations),
                       ("categories", categories)):
        if value is not None:
            data[key] = value
    ann = tmp_path / "ann.json"
    ann.write_text(raw if raw is not None else json.dumps(data))
    return ann, folder


def ann1(**fields):
    return [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 5, 10, 10], **fields}]


def im7(**fields):
    return [{"id": 7, "file_name": "a.png", "width": 40, "height": 30, **fields}]


# (name, dataset arguments, what the one-line message must say)
CASES = [
    ("no images", dict(images=[], annotations=[]), "'images' is empty"),
    ("categories but no images", dict(images=[], annotations=[],
                                      categories=[{"id": 3, "name": "x"}]), "'images' is empty"),
    ("images but no annotations", dict(annotations=[]), "'annotations' is empty: none of the 2"),
    ("no categories", dict(categories=[]), "'categories' is empty"),
    ("width is a string", dict(images=im7(width="40")),
     "images[0] (id 7): 'width' must be a positive number of pixels, got \"40\""),
    ("width is negative", dict(images=im7(width=-40)), "'width' must be a positive number"),
    ("height is NaN", dict(images=im7(height=float("nan"))), "'height' must be a positive "
     "number of pixels, got NaN"),
    ("wrong size", dict(images=im7(width=30, height=40)),
     "width x height is 30 x 40 in the JSON but 40 x 30 in the file"),
    ("bbox is a string", dict(annotations=ann1(bbox="10,10,5,5")),
     "annotations[0] (id 1): bbox must be [x, y, width, height] in pixels (4 finite numbers), "
     "got \"10,10,5,5\""),
    ("bbox has NaN", dict(annotations=ann1(bbox=[float("nan"), 1, 2, 3])),
     "bbox must be [x, y, width, height] in pixels (4 finite numbers), got [NaN, 1, 2, 3]"),
    ("bbox has inf", dict(annotations=ann1(bbox=[1, 1, float("inf"), 3])),
     "got [1, 1, Infinity, 3]"),
    ("bbox has 3 numbers", dict(annotations=ann1(bbox=[1, 1, 3])), "got [1, 1, 3]"),
    ("bbox has a bool", dict(annotations=ann1(bbox=[1, 1, True, 3])), "got [1, 1, true, 3]"),
    ("image_id is a list", dict(annotations=ann1(image_id=[7])),
     "'image_id' must be an integer (an id in 'images'), got [7]"),
    ("image_id is a string", dict(annotations=ann1(image_id="7")), "got \"7\""),
    ("unknown image", dict(annotations=ann1(image_id=8)), "refers to image id 8"),
    ("category_id is a float", dict(annotations=ann1(category_id=1.5)),
     "'category_id' must be an integer (an id in 'categories'), got 1.5"),
    ("iscrowd is a string", dict(annotations=ann1(iscrowd="0")), "'iscrowd' must be 0 or 1"),
    ("area is NaN", dict(annotations=ann1(area=float("nan"))), "'area' must be a number >= 0, "
     "got NaN"),
    ("duplicate image id", dict(images=[*im7(), {"id": 7, "file_name": "b.png"}]),
     "images[1] (id 7): image id 7 appears twice"),
    ("duplicate annotation id", dict(annotations=ann1() + ann1()),
     "annotations[1] (id 1): annotation id 1 appears twice (also annotations[0])"),
    ("duplicate category id", dict(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]),
     "categories[1]: category id 1 appears twice"),
    ("image id is a string", dict(images=im7(id="7")), "images[0]: 'id' must be an integer, "
     "got \"7\""),
    ("path traversal", dict(images=im7(file_name="../x.png")),
     "file_name \"../x.png\" leaves the image folder ('..')"),
    ("absolute path", dict(images=im7(file_name="/etc/passwd")),
     "file_name \"/etc/passwd\" is an absolute path"),
    ("NUL in a name", dict(images=im7(file_name="a\u0000.png")), "contains a NUL character"),
    ("lone surrogate in a name", dict(images=im7(file_name="\ud800.png")),
     "contains characters no file name can hold"),
    ("missing image", dict(images=im7(file_name="gone.png")), "gone.png (missing)"),
    ("all boxes degenerate", dict(annotations=ann1(bbox=[100, 100, 5, 5])),
     "all 1 boxes in 'annotations' are degenerate"),
    ("not a list", dict(raw='{"images": {}, "annotations": [], "categories": []}'),
     "missing the list 'images'"),
    ("5000-digit number", dict(raw='{"images": [], "x": ' + "9" * 5000 + "}"),
     "cannot be parsed (ValueError"),
    ("deep nesting", dict(raw="[" * 100000 + "]" * 100000), "cannot be parsed (RecursionError"),
]


@pytest.mark.parametrize("name,kwargs,expected", CASES, ids=[c[0] for c in CASES])
def test_each_bad_input_is_one_clear_line(tmp_path, name, kwargs, expected):
    ann, folder = write(tmp_path, **kwargs)
    with pytest.raises(DataError) as info:
        validate_coco(ann, folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(ann)) and expected in message, message
    # the CLI prints it verbatim: brackets are not rich markup, NaN and unicode survive
    r = CliRunner().invoke(app, ["data", "check", str(ann), "--images", str(folder)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip() == f"error: {message}", r.output


def test_a_valid_dataset_with_unicode_names_and_huge_numbers(tmp_path):
    """Accepted: a unicode file name, an annotation without id, a box far outside the image
    (clipped) and one with a 30-digit number (clipped), integral float sizes."""
    ann, folder = write(tmp_path, files={"猫 é.png": (40, 30), "b.png": (50, 20)},
                        images=[{"id": 7, "file_name": "猫 é.png", "width": 40.0, "height": 30},
                                {"id": 9, "file_name": "b.png"}],
                        annotations=[{"image_id": 7, "category_id": 1, "bbox": [-5, -5, 10, 10]},
                                     {"id": 4, "image_id": 9, "category_id": 2,
                                      "bbox": [1, 1, 10 ** 30, 5]}])
    data = validate_coco(ann, folder)
    assert [a["bbox"] for a in data["annotations"]] == [[0, 0, 5, 5], [1, 1, 49, 5]]
    assert [a["id"] for a in data["annotations"]] == [5, 4]  # numbered after the largest
    r = CliRunner().invoke(app, ["data", "check", str(ann), "--images", str(folder)])
    assert r.exit_code == 0 and "2 images, 2 boxes (0 crowd) of 2 categories: ok" in r.output


def test_symlink_to_nowhere_folder_and_non_image(tmp_path):
    ann, folder = write(tmp_path)
    (folder / "a.png").unlink()
    os.symlink(tmp_path / "nowhere.png", folder / "a.png")
    (folder / "b.png").unlink()
    (folder / "b.png").mkdir()
    with pytest.raises(DataError) as info:
        validate_coco(ann, folder)
    message = str(info.value)
    assert f"images[0] {folder / 'a.png'} (a symlink to nowhere ('{tmp_path / 'nowhere.png'}' " \
        "does not exist))" in message and f"images[1] {folder / 'b.png'} (not a file)" in message
    (folder / "b.png").rmdir()
    (folder / "b.png").write_text("not an image")
    with pytest.raises(DataError, match=r"b.png \(unreadable: cannot identify image file"):
        validate_coco(ann, folder)


def huge_png(path, width=20000, height=20000):
    """A PNG header claiming width x height pixels, with almost no pixel data: what a
    decompression bomb looks like to a reader of headers."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_image_over_the_pixel_limit_is_refused(tmp_path):
    ann, folder = write(tmp_path, images=[{"id": 7, "file_name": "a.png"}])
    huge_png(folder / "a.png")
    with pytest.raises(DataError, match=r"a.png \(too large: .*89,478,485 pixels"):
        validate_coco(ann, folder)


def with_cut_jpeg(tmp_path):
    """A dataset of a.jpg (id 7), cut to 70% of its bytes, and a good b.png (id 9)."""
    ann, folder = write(tmp_path, files={"b.png": (50, 20)},
                        images=[{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.png"}])
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(30, 40, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(folder / "a.jpg", quality=95)
    data = (folder / "a.jpg").read_bytes()
    (folder / "a.jpg").write_bytes(data[:int(len(data) * 0.7)])
    return ann, folder


def test_a_cut_jpeg_is_found_when_decoded_with_its_entry(tmp_path):
    """PIL's header check passes a JPEG cut short; decoding it, in the main process or a
    DataLoader worker, stops with one line naming the file and the entry."""
    ann, folder = with_cut_jpeg(tmp_path)
    ds = CocoDataset(ann, folder, AugmentConfig(eval_size=30), train=False)  # check passes
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers,
                                             collate_fn=collate)
        with pytest.raises(DataError) as info:
            next(iter(loader))
        message = str(info.value)
        assert message.startswith(f"{ann}: images[0] (id 7): image {folder / 'a.jpg'} cannot "
                                  "be read: image file is truncated"), message
        assert "\n" not in message


def test_training_stops_on_a_cut_image_with_one_line(tmp_path):
    from conftest import TINY

    ann, folder = with_cut_jpeg(tmp_path)
    args = ["train", "--data", str(ann), "--images", str(folder), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--batch-size", "2", "--workers", "0",
            "--set", "augment.train_scales=32", "--set", "augment.crop=false"]
    for k, v in TINY["detr"].items():
        if k != "num_classes":
            args += ["--set", f"{k}={v}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    error = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "images[0] (id 7)" in error[0] and "a.jpg cannot be read" in \
        error[0] and "(found while training); no checkpoint was written yet" in error[0], r.output


def test_too_few_images_for_a_batch_and_an_empty_val_set(tmp_path):
    ann, folder = write(tmp_path)
    empty = tmp_path / "val.json"
    empty.write_text(json.dumps({"images": [], "annotations": [],
                                 "categories": [{"id": 1, "name": "cat"}]}))
    base = ["train", "--data", str(ann), "--images", str(folder), "--out",
            str(tmp_path / "run"), "--workers", "0", "--set", "backbone=resnet18"]
    r = CliRunner().invoke(app, [*base, "--batch-size", "4"])
    assert r.exit_code == 1 and f"error: {ann}: 2 training image(s), fewer than one step of " \
        "4 per process x 1 process(es); lower --batch-size" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--val-data", str(empty), "--val-images", str(folder)])
    assert r.exit_code == 1 and f"error: {empty}: 'images' is empty" in r.output, r.output
    assert not (tmp_path / "run").exists()   # nothing is created for a run that cannot start


def test_bracketed_values_print_verbatim_on_every_error_path(tmp_path, monkeypatch):
    """fail() is the one way errors print; feed it brackets and NaN from each kind of
    source: the data check, --set, a missing image, a bad checkpoint, a weights path."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    ann, folder = write(tmp_path, annotations=ann1(bbox=[float("nan"), "[x]", 1, 2]))
    for args in (["data", "check", str(ann), "--images", str(folder)],
                 ["train", "--data", str(ann), "--images", str(folder)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1 and 'got [NaN, "[x]", 1, 2]' in r.output, r.output
    r = runner.invoke(app, ["train", "--set", "[bold]x"])
    assert r.exit_code == 1 and "got '[bold]x'" in r.output, r.output
    r = runner.invoke(app, ["predict", "[red]photo.png"])  # a glob pattern, matching nothing
    assert r.exit_code == 1 and "no file matches '[red]photo.png'" in r.output, r.output
    (tmp_path / "[w].pt").write_bytes(b"PK\x03\x04 cut short")
    r = runner.invoke(app, ["eval", "[w].pt"])
    assert r.exit_code == 1 and "[w].pt: truncated" in r.output, r.output
    r = runner.invoke(app, ["eval", "[i]nope.pt"])
    assert r.exit_code == 1 and "checkpoint '[i]nope.pt' not found" in r.output, r.output
