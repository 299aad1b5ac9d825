"""ONNX export: every method's file, run by onnxruntime, gives the PyTorch model's outputs at
other batch sizes and image sizes than it was traced at; post-processing in the graph
matches qdet.blocks.base.postprocess; RoiAlign, DeformConv and deformable attention against
torchvision / the reference op; predict and eval of a .onnx against the .pt; one-line
errors for ops with no ONNX form.

Tolerance: single ops, torch.testing.assert_close with rtol 1e-4 and atol 1e-5, i.e.
|ort - torch| <= 1e-5 + 1e-4 |torch| elementwise (relative 1e-4, with an absolute floor for
values near 0). Whole models: the tiny random-weight models amplify rounding (a box head's
exp, a level boundary), by 100x and more on some inputs, and how float32 rounds differs
between CPUs (with or without AVX-512) and runtimes; so the reference is the float64 model,
and onnxruntime must be as close to it as PyTorch's own float32 result is (within a factor 4,
plus the same 1e-5 + 1e-4 floor): a wrong op fails that on any CPU, rounding never does
(``qdet.weights.onnx_export.ImageCheck``, the same rule ``qdet export`` reports)."""
import copy
import json

import onnxruntime as ort
import pytest
import torch
from torchvision.ops import deform_conv2d, roi_align
from typer.testing import CliRunner

import qdet
from qdet.blocks.base import postprocess
from qdet.blocks.dynamic_head import roi_pool
from qdet.cli.app import app
from qdet.models.registry import build_model
from qdet.ops.deform_attn import ms_deform_attn_onnx, ms_deform_attn_torch
from qdet.ops.modes import export_mode
from qdet.weights.checkpoint import model_checkpoint, save_checkpoint
from qdet.weights.onnx_export import register_symbolics
from qdet.weights.onnx_runtime import ExportError, OnnxDetector

from conftest import TINY, TINY_SHAPES, random_images

TOL = dict(rtol=1e-4, atol=1e-5)


def assert_as_close_as_float32(got, ref32, ref64):
    """``got`` (onnxruntime) is as close to the float64 model as float32 PyTorch is."""
    got, ref32, ref64 = (torch.as_tensor(t).double() for t in (got, ref32, ref64))
    own = (ref32 - ref64).abs().max()
    bound = 4 * own + TOL["atol"] + TOL["rtol"] * ref64.abs()
    worst = ((got - ref64).abs() - bound).max()
    assert worst <= 0, (f"onnxruntime is {(got - ref64).abs().max():.3g} from float64, "
                        f"float32 PyTorch {own:.3g}")


def float64_outputs(model, x):
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        out = twin(x.double() if torch.is_tensor(x) else [t.double() for t in x])
    return out["pred_logits"], out["pred_boxes"]
# the tests that call torch.onnx.export themselves: its deprecation and tracer notes
DIRECT_EXPORT = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                           "ignore::torch.jit.TracerWarning")
TRACED = (64, 96)
SIZES = [(64, 96), (80, 64)]       # the second: other height, width and aspect than traced
VARIANTS = {
    "detr": ("detr", {}),
    "deformable": ("deformable", {}),
    "deformable-box-refine": ("deformable", {"with_box_refine": True}),
    "deformable-two-stage": ("deformable", {"with_box_refine": True, "two_stage": True}),
    "conditional": ("conditional", {}),
    "anchor-rcda": ("anchor", {}),
    "anchor-standard": ("anchor", {"attention": "standard"}),
    "efficient": ("efficient", {}),
    "dynamic": ("dynamic", {}),
    "sparse-rcnn": ("sparse-rcnn", {}),
    "dino": ("dino", {}),
}


def tiny_model(arch: str, extra: dict | None = None):
    """A tiny model whose zero-initialized layers (sampling offsets, attention weights, the
    deformable convolution's offsets, box heads) are perturbed, so that they take part."""
    torch.manual_seed(0)
    model = build_model(arch, {**TINY[arch], **(extra or {})}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.class_names = [f"c{i}" for i in range(model.config.num_classes)]
    model.category_ids = [10 + 2 * i for i in range(model.config.num_classes)]
    model.preprocess = {"size": 64, "max_size": None}
    return model


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out["pred_logits"], out["pred_boxes"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name)`` -> (model, path, report) of a variant, exported once per module."""
    folder, cache = tmp_path_factory.mktemp("onnx"), {}

    def get(name):
        if name not in cache:
            arch, extra = VARIANTS[name]
            model = tiny_model(arch, extra)
            report = qdet.export(model, folder / f"{name}.onnx", size=TRACED, check=False)
            assert not any(m.training for m in model.modules())   # left in eval mode
            cache[name] = model, report.path, report
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnxruntime_matches_pytorch_at_other_sizes_and_batches(name, exported):
    model, path, report = exported(name)
    assert report.dynamic and report.opset == 19 and report.file_mb > 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]
    for i, (h, w) in enumerate(SIZES):
        for b in (1, 3):
            x = torch.stack(random_images([(h, w)] * b, seed=10 * i + b))
            logits, boxes = session.run(None, {"images": x.numpy()})
            ref, ref64 = outputs(model, x), float64_outputs(model, x)
            assert_as_close_as_float32(logits, ref[0], ref64[0])
            assert_as_close_as_float32(boxes, ref[1], ref64[1])
    # what tracing saw (export_mode) computes what the model computes in PyTorch
    with export_mode():
        got = outputs(model, x)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **TOL)


@pytest.mark.parametrize("name", ["detr", "sparse-rcnn"])
def test_metadata_and_onnx_detector(name, exported):
    """Written by generic code, read back by qdet.load: two methods suffice."""
    model, path, _ = exported(name)
    det = qdet.load(path)
    assert isinstance(det, OnnxDetector)
    assert (det.arch, det.focal) == (model.arch, model.focal)
    assert det.class_names == model.class_names and det.category_ids == model.category_ids
    assert det.preprocess == model.preprocess
    assert json.loads(det.metadata["qdet.config"])["d_model"] == model.config.d_model
    # images of different sizes: each runs alone, as PyTorch does for one image
    images = random_images([(64, 96), (80, 64), (64, 96)], seed=5)
    out = det(images)
    for i, im in enumerate(images):
        ref, ref64 = outputs(model, im[None]), float64_outputs(model, im[None])
        assert_as_close_as_float32(out["pred_logits"][i], ref[0][0], ref64[0][0])
        assert_as_close_as_float32(out["pred_boxes"][i], ref[1][0], ref64[1][0])


@pytest.mark.parametrize("arch", ["detr", "deformable"])
def test_postprocess_graph_matches_qdet_postprocess(arch, tmp_path):
    """softmax (DETR: every query) and focal (top-k over queries x classes) heads."""
    model = tiny_model(arch)
    path = tmp_path / "post.onnx"
    report = qdet.export(model, path, size=TRACED, postprocess=True, topk=20, check=False)
    assert report.postprocess
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "orig_sizes"]
    x = torch.stack(random_images([(80, 64)] * 3, seed=7))
    sizes = torch.tensor([[480, 384], [100, 77], [81, 64]])
    scores, labels, boxes = session.run(None, {"images": x.numpy(), "orig_sizes": sizes.numpy()})
    with torch.no_grad():
        ref = postprocess(model(x), sizes, model.focal, topk=20)
    for i, r in enumerate(ref):
        torch.testing.assert_close(torch.from_numpy(scores[i]), r["scores"], **TOL)
        assert torch.equal(torch.from_numpy(labels[i]), r["labels"])
        torch.testing.assert_close(torch.from_numpy(boxes[i]), r["boxes"], rtol=1e-4, atol=1e-3)
    with pytest.raises(ExportError, match="--postprocess"):
        qdet.load(path)(x)


def test_static_export_takes_only_its_size(tmp_path):
    model = tiny_model("conditional")
    report = qdet.export(model, tmp_path / "static.onnx", size=TRACED, dynamic=False)
    assert report.checked == [(1, 3, *TRACED)] and report.max_rel_diff < 1e-4
    det = qdet.load(tmp_path / "static.onnx")
    assert det.input_shape == [1, 3, *TRACED]
    x = torch.stack(random_images([TRACED] * 2, seed=2))   # batch 2: one image at a time
    for a, b in zip((det(x)["pred_logits"], det(x)["pred_boxes"]), outputs(model, x)):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ExportError, match="static export.*--dynamic"):
        det(random_images([(80, 64)]))


def test_the_check_compares_each_image_with_the_float64_model(tmp_path):
    """The export check reports every image of its inputs against the float64 model; a
    graph that computes something else (here: the PyTorch model changed after export, as a
    wrong op would) is caught on every image, a faithful one on none."""
    from qdet.weights.onnx_export import ExportGraph, _check

    model = tiny_model("detr")
    report = qdet.export(model, tmp_path / "m.onnx", size=TRACED)
    assert [(c.shape[0], c.index) for c in report.images] == [(1, 0), (2, 0), (2, 1)]
    assert not report.disagreements and "every image within float32 rounding" in \
        report.summary()
    with torch.no_grad():
        model.class_embed.bias += 0.01      # the file now disagrees with the model
    report.images, report.checked = [], []
    _check(report, ExportGraph(model).eval())
    assert len(report.disagreements) == 3
    assert "3 of 3 images disagree" in report.summary() and "image 1 of 2x3x" in \
        report.summary()


def test_roi_align_half_pixel_is_torchvision_aligned():
    """ONNX RoiAlign with coordinate_transformation_mode=half_pixel, built by hand, against
    torchvision's roi_align(aligned=True) as Sparse R-CNN calls it (sampling ratio 2)."""
    import numpy as np
    from onnx import TensorProto, helper

    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], mode="avg",
                            coordinate_transformation_mode="half_pixel", output_height=7,
                            output_width=7, sampling_ratio=2, spatial_scale=0.25)
    graph = helper.make_graph(
        [node], "roi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("rois", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("idx", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 8, 20, 24, generator=g)
    xy = torch.rand(30, 4, generator=g) * torch.tensor([96., 80., 96., 80.]) - 4  # some outside
    boxes = torch.cat([torch.minimum(xy[:, :2], xy[:, 2:]), torch.maximum(xy[:, :2], xy[:, 2:])], 1)
    boxes[:3, 2:] = boxes[:3, :2] + 0.3                                   # tiny boxes too
    idx = torch.randint(0, 2, (30,), generator=g)
    got = session.run(None, {"x": feat.numpy(), "rois": boxes.numpy(), "idx": idx.numpy()})[0]
    ref = roi_align(feat, torch.cat([idx[:, None].float(), boxes], 1), 7, spatial_scale=0.25,
                    sampling_ratio=2, aligned=True)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)


class Pooler(torch.nn.Module):
    def forward(self, p2, p3, p4, p5, boxes):
        return roi_pool([p2, p3, p4, p5], boxes, 7)


@DIRECT_EXPORT
def test_exported_pooler_assigns_levels_as_pytorch(tmp_path):
    """Boxes at P2, P3 and P4 and none at P5: the traced pooler has no branch on which
    levels are used."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, 256 // 2 ** i, 256 // 2 ** i, generator=g) for i in range(2, 6)]
    sides = torch.tensor([[40., 150., 300.], [60., 100., 260.]])        # levels 2, 3, 4
    corner = torch.rand(2, 3, 2, generator=g) * 20
    boxes = torch.cat([corner, corner + sides[..., None]], -1)           # [N=2, P=3, 4]
    register_symbolics()
    with export_mode():
        torch.onnx.export(Pooler(), (*feats, boxes), tmp_path / "pool.onnx", dynamo=False,
                          opset_version=19, input_names=["p2", "p3", "p4", "p5", "boxes"],
                          dynamic_axes={"boxes": {0: "n", 1: "p"}})
    session = ort.InferenceSession(str(tmp_path / "pool.onnx"),
                                   providers=["CPUExecutionProvider"])
    feed = {f"p{i + 2}": f.numpy() for i, f in enumerate(feats)}
    for b in (boxes, boxes[:, :1] * 0.5, boxes.flip(1)):                # other counts, levels
        got = session.run(None, {**feed, "boxes": b.contiguous().numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), roi_pool(feats, list(b), 7), **TOL)


class DeformConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 8, 3, 3) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(6))

    def forward(self, x, offset, mask):
        return deform_conv2d(x, offset, self.weight, self.bias, padding=1, mask=mask)


@DIRECT_EXPORT
def test_deform_conv2d_exports_as_onnx_deformconv(tmp_path):
    """Offsets of a few pixels in both directions and a modulation mask: the (y, x) offset
    layout and the mask reach ONNX DeformConv as torchvision means them."""
    register_symbolics()
    g = torch.Generator().manual_seed(0)
    conv = DeformConv()
    x, offset = torch.randn(2, 8, 10, 12, generator=g), torch.randn(2, 18, 10, 12, generator=g) * 2
    mask = torch.rand(2, 9, 10, 12, generator=g)
    torch.onnx.export(conv, (x, offset, mask), tmp_path / "dc.onnx", dynamo=False,
                      opset_version=19, input_names=["x", "offset", "mask"],
                      dynamic_axes={n: {0: "b", 2: "h", 3: "w"} for n in ("x", "offset", "mask")})
    session = ort.InferenceSession(str(tmp_path / "dc.onnx"), providers=["CPUExecutionProvider"])
    x2, off2 = torch.randn(1, 8, 7, 9, generator=g), torch.randn(1, 18, 7, 9, generator=g) * 3
    mask2 = torch.rand(1, 9, 7, 9, generator=g)
    for a, o, m in ((x, offset, mask), (x2, off2, mask2)):
        got = session.run(None, {"x": a.numpy(), "offset": o.numpy(), "mask": m.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), conv(a, o, m), **TOL)


def test_export_formulation_of_deformable_attention_is_the_reference():
    from qdet.tools.bench import deform_attn_inputs

    levels = [(12, 15), (6, 8), (3, 4)]
    for nq in (None, 20):
        (value, loc, attn), lv = deform_attn_inputs(nq, "cpu", batch=2, heads=2, channels=4,
                                                    points=3, levels=levels)
        torch.testing.assert_close(ms_deform_attn_onnx(value, lv, loc, attn),
                                   ms_deform_attn_torch(value, lv, loc, attn), **TOL)


class _Scale(torch.nn.Module):
    """Wraps a layer in a custom op that has no ONNX form."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return _no_onnx(self.inner(x))


@torch.library.custom_op("qdet_test::no_onnx", mutates_args=())
def _no_onnx(x: torch.Tensor) -> torch.Tensor:
    return x * 1.0


@_no_onnx.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_op_without_onnx_form_is_one_line_naming_method_and_op(tmp_path):
    model = tiny_model("detr")
    model.input_proj = _Scale(model.input_proj)
    with pytest.raises(ExportError) as e:
        qdet.export(model, tmp_path / "x.onnx", size=TRACED)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("detr: ") and "qdet_test::no_onnx" in msg
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_error_names_method_op_and_opset(tmp_path):
    ckpt = tmp_path / "dyn.pt"
    save_checkpoint(ckpt, model_checkpoint(tiny_model("dynamic")))
    result = CliRunner().invoke(app, ["export", str(ckpt), "--opset", "18", "--size", "64x64"])
    assert result.exit_code == 1
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert lines[-1].startswith("error: dynamic: the op torchvision::deform_conv2d")
    assert "opset 18" in lines[-1] and "--opset 19" in lines[-1]
    result = CliRunner().invoke(app, ["export", str(ckpt), "--opset", "13"])
    assert result.exit_code == 1 and "opset >= 16" in result.output


# ------------------------------------------------------------- predict / eval of a .onnx


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny DETR run trained through the CLI, exported with the CLI."""
    cwd = tmp_path_factory.mktemp("cli")
    args = ["train", "--arch", "detr", "--epochs", "1", "--out", str(cwd / "run"),
            *TINY_SHAPES]
    for k, v in TINY["detr"].items():
        if k != "num_classes":
            args += ["--set", f"{k}={v}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    best = cwd / "run" / "best.pt"
    result = CliRunner().invoke(app, ["export", str(best), "--out", str(cwd / "model.onnx")])
    assert result.exit_code == 0, result.output
    return cwd, best, cwd / "model.onnx", result.output


def test_cli_export_summary(trained_run):
    cwd, _, onnx_path, output = trained_run
    assert onnx_path.is_file()
    text = " ".join(output.split())
    assert "MB" in text and "exported in" in text and "max rel diff" in text
    assert "1x3x64x64" in text and "2x3x48x80" in text     # traced size, then another
    rel = float(text.split("max rel diff")[1].split()[0].rstrip(";"))
    assert rel < 1e-4 and "every image within float32 rounding" in text
    det = qdet.load(onnx_path)
    assert det.class_names == ["rectangle", "ellipse", "triangle", "cross", "star"]
    assert det.data_info["data"]["kind"] == "shapes"


def test_cli_predict_with_onnx_weights_matches_pt(trained_run, monkeypatch):
    cwd, best, onnx_path, _ = trained_run
    monkeypatch.chdir(cwd)
    from qdet.data.shapes import ShapesConfig, render

    render(ShapesConfig(image_size=64), "val", 1)[0].save(cwd / "photo.png")
    preds = {}
    for name, weights in (("pt", best), ("onnx", onnx_path)):
        result = CliRunner().invoke(app, ["predict", "photo.png", "--weights", str(weights),
                                          "--threshold", "0.0", "--out", name])
        assert result.exit_code == 0, result.output
        preds[name] = json.loads((cwd / name / "predictions.json").read_text())[0]["detections"]
    assert len(preds["onnx"]) == len(preds["pt"]) > 0
    for a, b in zip(preds["onnx"], preds["pt"]):
        assert (a["name"], a["category_id"]) == (b["name"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["box"] == pytest.approx(b["box"], abs=0.02)
    result = CliRunner().invoke(app, ["predict", "photo.png", "--weights", str(onnx_path),
                                      "--bf16"])
    assert result.exit_code == 1 and "--bf16 does not apply to an ONNX file" in result.output


def test_cli_eval_of_onnx_equals_pt(trained_run, monkeypatch):
    cwd, best, onnx_path, _ = trained_run
    monkeypatch.chdir(cwd)
    res, ap = {}, {}
    for name, weights in (("pt", best), ("onnx", onnx_path)):
        result = CliRunner().invoke(app, ["eval", str(weights), "--workers", "0",
                                          "--out", f"{name}.json"])
        assert result.exit_code == 0, result.output
        res[name] = json.loads((cwd / f"{name}.json").read_text())
        # the summary table (7 metrics); the per-class table follows it
        row = next(l for l in result.output.splitlines() if l.count("│") == 8
                   and l.strip("│ ").split("│")[0].strip().replace(".", "").isdigit())
        ap[name] = [float(v) for v in row.strip("│ ").split("│")]
    assert len(res["onnx"]) == len(res["pt"]) > 0
    for a, b in zip(res["onnx"], res["pt"]):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.02)
    assert ap["onnx"] == pytest.approx(ap["pt"], abs=0.002)


def test_bench_export_plumbing():
    """The benchmark's plumbing (not its numbers), on a tiny model."""
    from qdet.tools.bench_onnx import bench_export

    row = bench_export("deformable", (64, 64), repeat=1, overrides=TINY["deformable"])
    assert row["file_mb"] > 0 and row["export_s"] > 0 and row["onnxruntime_s"] > 0
    assert row["max_rel_diff"] < 1e-4
