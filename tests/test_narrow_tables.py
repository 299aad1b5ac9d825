"""match-debug, explain and predict read at 80 columns (and 120): no cell cut to "…", no
line wider than the terminal, every cell whole on one line (no box or number wrapped), and
one wide table instead of two when the terminal has room for it."""
import pytest
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qdet.cli.predict import detections_table
from qdet.models.registry import build_model
from qdet.tools.explain import explain
from qdet.tools.explain_view import render as render_explain
from qdet.tools.match_debug import debug_image, duplicates
from qdet.tools.match_debug import explain as match_rows
from qdet.tools.match_debug import render as render_match

from conftest import TINY

# COCO's longest class names, so that the widths tested are the real worst case
LONG_NAMES = ["baseball glove", "tennis racket", "traffic light", "potted plant", "hair drier"]


class Recording(Console):
    """A console that keeps the tables it prints."""

    def __init__(self, width: int):
        super().__init__(width=width, record=True, color_system=None, force_terminal=False)
        self.tables: list[Table] = []

    def print(self, *objects, **kwargs):
        self.tables += [o for o in objects if isinstance(o, Table)]
        super().print(*objects, **kwargs)


def assert_readable(console: Recording, fold_ok=()):
    text = console.export_text()
    lines = text.splitlines()
    assert "…" not in text
    assert max(len(line) for line in lines) <= console.width
    assert console.tables
    for table in console.tables:
        for column in table.columns:
            for cell in [column.header, *column.cells]:
                plain = Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)
                if plain and plain not in fold_ok:
                    assert any(plain in line for line in lines), \
                        f"cell {plain!r} is not whole on one line at {console.width} columns"
    return text


def match_result(n_targets=6, layers=6):
    g = torch.Generator().manual_seed(0)
    q = 20
    cls, bbox, giou = (torch.randn(q, n_targets, generator=g) * 3 for _ in range(3))
    probs = torch.rand(q, 5, generator=g)
    pred = torch.cat([torch.rand(q, 2, generator=g), torch.rand(q, 2, generator=g) * 0.3], 1)
    tgt = torch.cat([torch.rand(n_targets, 2, generator=g),
                     torch.rand(n_targets, 2, generator=g) * 0.3], 1)
    labels = torch.randint(0, 5, (n_targets,), generator=g)
    rows = match_rows(cls, bbox, giou, probs, pred, labels, tgt)
    dups = duplicates(rows, probs, pred.clone(), threshold=0.0, min_iou=0.0)
    return {"rows": rows, "layers": [[r.query for r in rows]] * layers,
            "changes": [0] * (layers - 1), "duplicates": dups,
            "weights": {"class": 2, "bbox": 5, "giou": 2}, "focal": True, "num_queries": q}


@pytest.mark.parametrize("width", [80, 120])
def test_match_debug_reads_at_narrow_widths(width):
    console = Recording(width)
    result = match_result()
    render_match(result, LONG_NAMES, console, title="image 123456: ")
    text = assert_readable(console)
    assert len(console.tables) == 4            # matches, costs, per layer, duplicates
    assert "runner-up" in text and "✓" in text
    for r in result["rows"]:                   # each target's box and total on one line
        assert any(f"{r.target_box[0]:.2f}" in line and LONG_NAMES[r.target_label] in line
                   for line in text.splitlines())


def test_match_debug_uses_the_width_when_there_is_some():
    console = Recording(200)
    render_match(match_result(), LONG_NAMES, console)
    assert_readable(console)
    assert len(console.tables) == 3            # matches and costs in one table
    assert {"IoU", "GIoU", "row min"} <= {c.header for c in console.tables[0].columns}


def test_match_debug_of_a_model_reads_at_80():
    model = build_model("detr", TINY["detr"]).eval()
    model.class_names = LONG_NAMES
    target = {"labels": torch.tensor([0, 3, 1]),
              "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .6, .3, .4], [.5, .5, .9, .9]])}
    res = debug_image(model, torch.randn(3, 64, 64), target, threshold=0.0)
    console = Recording(80)
    render_match(res, LONG_NAMES, console)
    assert_readable(console)


def big_picture():
    g = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(800, 1333, 3, generator=g) * 255).byte().numpy())


@pytest.mark.parametrize("arch", sorted(TINY))
def test_explain_reads_at_narrow_widths(arch):
    cfg = dict(TINY[arch])
    if "num_feature_levels" in cfg:
        cfg["num_feature_levels"] = 4          # the paper's four levels: the widest table
    model = build_model(arch, cfg).eval()
    model.class_names = LONG_NAMES
    model.preprocess = {"size": 64, "max_size": None}      # boxes in 1333x800 pixels
    ex = explain(model, big_picture(), top=3, encoder=(600, 300) if arch == "detr" else None)
    for width in (80, 120):
        console = Recording(width)
        render_explain(ex, console)
        text = assert_readable(console)
        assert text.count("object ") >= 3
        for obj in ex:                          # final boxes as 4 whole numbers on a line
            assert " ".join(f"{v:.0f}" for v in obj.box.tolist()) in text


def test_explain_uses_the_width_when_there_is_some():
    model = build_model("detr", TINY["detr"]).eval()
    ex = explain(model, torch.randn(3, 64, 64), top=2)
    narrow, wide = Recording(80), Recording(160)
    render_explain(ex, narrow)
    render_explain(ex, wide)
    assert len(narrow.tables) == 2 * len(wide.tables)      # layers and terms side by side
    assert_readable(wide)


@pytest.mark.parametrize("width", [80, 120])
def test_predict_table_reads_at_narrow_widths(width):
    long_name = "a_photo_with_a_very_long_file_name_from_a_phone_camera_2024-06-01_12-30-45.jpg"
    results = [{"image": f"/data/{long_name}", "detections": [
        {"name": n, "label": i, "score": 0.98 - 0.1 * i, "box": [1234.56, 567.8, 1333.0, 799.9]}
        for i, n in enumerate(LONG_NAMES)]},
        {"image": "empty.jpg", "detections": []}]
    console = Recording(width)
    console.print(detections_table(results))
    text = assert_readable(console, fold_ok={long_name})
    lines = text.splitlines()
    first_column = "".join(line[:lines[0].index("class")].strip() for line in lines[2:])
    assert first_column.count(long_name) == 1      # folded, not cut, and on its first row only
    assert text.count("1235 568 1333 800") == len(LONG_NAMES)


def test_predict_draws_small_images_enlarged():
    from qdet.tools.draw import draw_detections

    img = Image.new("RGB", (64, 48), (0, 0, 0))
    det = [{"name": "star", "label": 0, "score": 0.9, "box": [10, 10, 30, 20]}]
    drawn = draw_detections(img, det)
    k = drawn.width // 64
    assert drawn.size == (64 * k, 48 * k) and k * 64 >= 512
    # the box is drawn at k times its coordinates, and the label sits above it, off the box
    assert drawn.getpixel((20 * k, 20 * k)) != (0, 0, 0)         # bottom edge
    assert drawn.getpixel((20 * k, 15 * k)) == (0, 0, 0)         # inside the box: untouched
    big = Image.new("RGB", (800, 600))
    assert draw_detections(big, det).size == (800, 600)
