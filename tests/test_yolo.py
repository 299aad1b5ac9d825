"""YOLO sets as they come (issue 33): Roboflow's export and Ultralytics' layouts, each built by
hand here and read against boxes computed by hand (or the COCO reading of the same boxes);
every quirk the issue names, every kind of bad label line (one line each, naming file and
line, the text verbatim), and hostile YAML refused."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from qdet.cli.app import app
from qdet.data.coco import validate_coco
from qdet.data.errors import DataError, DataProblems
from qdet.data.formats import detect_format, read_split

ROBOFLOW_YAML = """train: ../train/images
val: ../valid/images

nc: 3
names:
- helmet
- 'no'
- person

roboflow:
  workspace: my-workspace
  project: hard-hats-abc12
  version: 2
  license: CC BY 4.0
"""


def image(path, size=(40, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 60, 90)).save(path)


def text(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


@pytest.fixture
def roboflow(tmp_path):
    """Roboflow's layout: train/valid, images 40x20 and 50x40, three label files."""
    root = tmp_path / "hats"
    text(root / "data.yaml", ROBOFLOW_YAML)
    text(root / "README.roboflow.txt", "exported")
    image(root / "train/images/a_jpg.rf.1.jpg")
    image(root / "train/images/b_jpg.rf.2.png", (50, 40))
    image(root / "train/images/c_jpg.rf.3.jpg")
    text(root / "train/labels/a_jpg.rf.1.txt", "0 0.5 0.5 0.5 0.5\n2 0.25 0.75 0.1 0.2\n")
    text(root / "train/labels/b_jpg.rf.2.txt", "\n1 0.5 0.5 1 1\n")   # a blank line, skipped
    image(root / "valid/images/d.jpg")
    text(root / "valid/labels/d.txt", "2 0.5 0.5 0.2 0.2\n")
    return root


def boxes_of(data):
    """(file name, category name, [x, y, w, h]) of each annotation, in pixels."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    return sorted((files[a["image_id"]], names[a["category_id"]], a["bbox"], a["iscrowd"])
                  for a in data["annotations"])


def test_a_roboflow_export_reads_as_the_same_boxes_in_coco(roboflow, tmp_path):
    sd = read_split(roboflow, "train")
    # the same boxes written by hand as COCO: pixels of a 40x20 and a 50x40 image
    coco = {"images": [{"id": 1, "file_name": "a_jpg.rf.1.jpg"},
                       {"id": 2, "file_name": "b_jpg.rf.2.png"},
                       {"id": 3, "file_name": "c_jpg.rf.3.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10]},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [8, 13, 4, 4]},
                            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 40]}],
            "categories": [{"id": 1, "name": "helmet"}, {"id": 2, "name": "no"},
                           {"id": 3, "name": "person"}]}
    (tmp_path / "hand.json").write_text(json.dumps(coco))
    expected = validate_coco(tmp_path / "hand.json", roboflow / "train" / "images")
    got, want = boxes_of(sd.data), boxes_of(expected)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for g, w in zip(got, want):
        assert g[2] == pytest.approx(w[2], abs=1e-9)
    assert sd.counts["background images"] == 1           # c has no label file
    assert sd.image_root == roboflow.resolve() / "train" / "images"
    assert [c["name"] for c in sd.data["categories"]] == ["helmet", "no", "person"]
    assert detect_format(roboflow) == detect_format(roboflow / "data.yaml") == "yolo"


def test_the_roboflow_path_fallback_is_said_once(roboflow):
    r = CliRunner().invoke(app, ["data", "check", str(roboflow)])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "paths starting with '../' that do not exist are read without " \
        "it" in notes[0] and "Roboflow" in notes[0], r.output
    assert f"{roboflow / 'data.yaml'} (train): 3 images, 3 boxes of 3 classes (1 background " \
        "images): ok" in r.output
    assert f"{roboflow / 'data.yaml'} (val): 1 images, 1 boxes of 3 classes: ok" in r.output


def test_ultralytics_layouts_list_files_and_name_maps(tmp_path, monkeypatch):
    """``path:`` relative to the YAML, images/train -> labels/train, a .txt list of
    ``./images/...`` lines and a list of entries; names as an {id: name} map with string
    keys; an empty label file is a background image; a segmentation line is its box."""
    root = tmp_path / "set"
    image(root / "images/train/x.jpg", (100, 50))
    image(root / "images/extra/y.jpg", (100, 50))
    image(root / "images/val/z.jpg", (100, 50))
    text(root / "labels/train/x.txt", "1 0.1 0.2 0.5 0.2 0.3 0.6\n")   # a triangle
    text(root / "labels/extra/y.txt", "")
    text(root / "labels/val/z.txt", "0 0.5 0.5 0.5 0.5\n")
    text(root / "val.txt", "./images/val/z.jpg\n\n")
    text(tmp_path / "cfg" / "set.yaml", "path: ../set\ntrain: [images/train, images/extra]\n"
         "val: val.txt\nnames:\n  '0': car\n  '1': bus\n")
    monkeypatch.chdir(tmp_path / "cfg")      # the YAML's folder decides, not this one
    train = read_split(tmp_path / "cfg" / "set.yaml", "train")
    assert boxes_of(train.data) == [("train/x.jpg", "bus", [10.0, 10.0, 40.0, 20.0], 0)]
    assert train.counts == {"background images": 1, "polygons read as boxes": 1}
    assert any("1 segmentation label line(s)" in n for n in train.notes)
    val = read_split(tmp_path / "cfg", "val")       # the folder holding the YAML
    assert boxes_of(val.data) == [("z.jpg", "car", [25.0, 12.5, 50.0, 25.0], 0)]


def write_set(tmp_path, labels: dict[str, str], names="[a, b]", extra_files=()):
    """A minimal Ultralytics set: images/train/<stem>.jpg (40x20) with the given labels."""
    root = tmp_path / "d"
    text(root / "data.yaml", f"train: images/train\nnames: {names}\n")
    for stem, content in labels.items():
        image(root / "images/train" / f"{stem}.jpg")
        if content is not None:
            text(root / "labels/train" / f"{stem}.txt", content)
    for name in extra_files:
        text(root / name, "0 0.5 0.5 0.1 0.1\n")
    return root


# (label line, what the one line says after "labels/train/p.txt:1: ")
BAD_LINES = [
    ("0 0.5 0.5 0.2", "3 number(s) after the class; a box is 'class cx cy w h' (4)"),
    ("0 0.5 0.5 0.2 0.2 0.1", "5 number(s) after the class"),
    ("0 0.5 abc 0.2 0.2", '"abc" is not a number (line: "0 0.5 abc 0.2 0.2")'),
    ("car 0.5 0.5 0.2 0.2", '"car" is not a number'),
    ("0 0.5 nan 0.2 0.2", '"nan" is not a number'),
    ("2 0.5 0.5 0.2 0.2", "class 2 is not in names (classes 0-1)"),
    ("-1 0.5 0.5 0.2 0.2", "class -1 is not in names"),
    ("0.5 0.5 0.5 0.2 0.2", "class 0.5 is not in names"),
    ("0 1.5 0.5 0.2 0.2", "1.5 is outside [0, 1]; YOLO coordinates are fractions"),
    ("0 0.5 0.5 -0.2 0.2", "-0.2 is outside [0, 1]"),
    ("0 0.5 0.5 0 0.2", "width and height must be > 0"),
    ("1 0.1 0.1 0.1 0.1 0.1 0.1", "the polygon has no width or no height"),
]


@pytest.mark.parametrize("line,says", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_each_bad_label_line_is_one_line_naming_file_and_line(tmp_path, line, says):
    root = write_set(tmp_path, {"p": f"0 0.5 0.5 0.1 0.1\n{line}\n"})
    with pytest.raises(DataProblems) as info:
        read_split(root, "train")
    label = root.resolve() / "labels" / "train" / "p.txt"
    assert info.value.problems == [f"{label}:2: {says}" + info.value.problems[0].split(
        says, 1)[1]], info.value.problems
    assert says in str(info.value) and "\n" not in str(info.value)
    assert f'(line: "{line}")' in info.value.problems[0]


def test_every_problem_is_listed_by_data_check_and_training_stops_on_the_first(tmp_path):
    root = write_set(tmp_path, {"p": "0 0.5 0.5 0.2\n5 0.5 0.5 0.1 0.1\n", "q": "0 2 0.5 0.1 0.1\n",
                                "r": None}, extra_files=["labels/train/orphan.txt"])
    (root / "images/train/r.jpg").write_bytes(b"not a jpeg")
    r = CliRunner().invoke(app, ["data", "check", str(root)])
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    labels = root.resolve() / "labels" / "train"
    assert errors[0] == f"error: {labels / 'orphan.txt'}: a label file without an image (no " \
        f"image named orphan.* in {root / 'images/train'}); add the image or delete the label file"
    assert errors[1].startswith(f"error: {labels / 'p.txt'}:1: 3 number(s)")
    assert errors[2].startswith(f"error: {labels / 'p.txt'}:2: class 5 is not in names")
    assert errors[3].startswith(f"error: {labels / 'q.txt'}:1: 2 is outside [0, 1]")
    assert errors[4].startswith(f"error: image {root.resolve() / 'images/train/r.jpg'}: "
                                "unreadable")
    assert errors[5] == f"error: {root}: 1 of 1 split(s) have problems (above)"
    assert len(errors) == 6
    r = CliRunner().invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"error: {labels / 'orphan.txt'}: a label file") and \
        "(and 4 more problems; `qdet data check` lists them)" in r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text,says", [
    ("train: images/train\nnames: !!python/object/apply:os.system ['touch PWNED']\n",
     "line 2, column 8: refused: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'; qdet reads YAML with PyYAML's safe "
     "loader"),
    ("train: images/train\nnames: !!python/name:os.system\n",
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'"),
    ("train: images/train\nnames: [a, b\n", "not valid YAML (line 3, column 1: "),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\ntrain: images/train\nnames: *c\n",
     "names[0] must be a class name"),           # an alias bomb stays a few references
    ("train: images/train\nnames: [a, b]\nnc: 3\n", "'nc' is 3 but 'names' has 2 classes"),
    ("train: images/train\n", "no 'names' (the class names"),
    ("- train\n- val\n", "expected keys such as 'train', 'val' and 'names', found a list"),
    ("names: [a]\n", "no 'train', 'val' or 'test' entry"),
    ("", "empty; a dataset YAML names train, val and the classes"),
])
def test_hostile_or_broken_yaml_is_refused_in_one_line(tmp_path, monkeypatch, yaml_text, says):
    monkeypatch.chdir(tmp_path)
    root = write_set(tmp_path, {"p": "0 0.5 0.5 0.1 0.1\n"})
    (root / "data.yaml").write_text(yaml_text)
    with pytest.raises(DataError) as info:
        read_split(root, "train")
    message = str(info.value)
    assert message.startswith(f"{root / 'data.yaml'}: ") and says in message, message
    assert "\n" not in message and not (tmp_path / "PWNED").exists()
    r = CliRunner().invoke(app, ["data", "check", str(root)])
    assert r.exit_code == 1 and r.output.strip() == f"error: {message}"


def test_yes_and_no_stay_class_names_and_missing_splits_are_said(tmp_path):
    root = write_set(tmp_path, {"p": "1 0.5 0.5 0.1 0.1\n"}, names="[yes, off]")
    sd = read_split(root, "train")
    assert [c["name"] for c in sd.data["categories"]] == ["yes", "off"]
    with pytest.raises(DataError, match=r"no 'val' split \(it has train\); pick one with "
                                         r"--split"):
        read_split(root, "val")
    with pytest.raises(DataError, match="--images applies to a COCO file"):
        read_split(root, "train", images=tmp_path)
