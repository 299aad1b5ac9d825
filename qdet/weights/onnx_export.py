"""ONNX export of every qdet method (the file is run by ``qdet.weights.onnx_runtime``).

``export(model, path)`` traces the model into one ONNX graph:

- input ``images``: float32 ``[B,3,H,W]``, normalized as evaluation does (the file's
  metadata carries the resize: ``preprocess``);
- outputs ``pred_logits`` ``[B,Q,C(+1)]`` and ``pred_boxes`` ``[B,Q,4]`` (normalized cx, cy,
  w, h), as ``model(images)`` returns them; or, with ``postprocess=True``, a second input
  ``orig_sizes`` int64 ``[B,2]`` (h, w of each original image) and the outputs ``scores``
  ``[B,K]``, ``labels`` ``[B,K]`` (int64) and ``boxes`` ``[B,K,4]`` (pixels of the original
  image, x0 y0 x1 y1): ``qdet.blocks.base.postprocess`` in the graph (softmax models: K = Q;
  focal models: the top ``topk`` (query, class) pairs);
- B, H and W dynamic by default (``dynamic=False``: fixed to the traced example);
- ``metadata_props``: arch, head kind, class names, category ids, preprocess, config, and
  the checkpoint's data description, so a file is evaluated and drawn with no other input.

The exporter is torch's TorchScript-based one (``dynamo=False``): it exports all seven
methods with dynamic B/H/W in about a second per tiny model, where the torch.export-based
one took 10-20 s and wrote an Anchor DETR graph onnxruntime refused. While tracing,
``qdet.ops.modes.exporting()`` is True and layers take their traceable formulations (sizes stay
tensors; deformable attention is the grid_sample formulation; Sparse R-CNN's RoIAlign is
ONNX RoiAlign with ``half_pixel``, which is torchvision's ``aligned=True``, opset 16); the
symbolic registered here maps torchvision's deformable convolution (Dynamic DETR) to ONNX
DeformConv (opset 19), which onnxruntime runs.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..blocks.base import Detector, model_device, postprocess_batch
from ..common.files import atomic_path
from ..ops.modes import export_mode
from .onnx_runtime import FORMAT, POST_OUTPUTS, RAW_OUTPUTS, ExportError, require

DEFAULT_OPSET = 19
MIN_OPSET = 16          # GridSample, RoiAlign with half_pixel
# ops whose ONNX form needs a newer opset than MIN_OPSET
OP_OPSET = {"torchvision::deform_conv2d": 19}
# |a - b| / max(|b|, REL_FLOOR): relative where values are not tiny, absolute below
REL_FLOOR = 0.1


# ------------------------------------------------------------------------ symbolics


def _deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h,
                            pad_w, dil_h, dil_w, groups, offset_groups, use_mask):
    """torchvision::deform_conv2d -> ONNX DeformConv (opset 19); the offset layout (y, x
    per kernel tap) and the modulation mask are the same in both."""
    from torch.onnx import symbolic_helper as sh

    args = [sh._maybe_get_const(a, "i") for a in (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                                  groups, offset_groups)]
    sth, stw, ph, pw, dh, dw, grp, ogrp = args
    kh, kw = sh._get_tensor_sizes(weight)[2:]
    inputs = [input, weight, offset, bias]
    if sh._maybe_get_const(use_mask, "b"):
        inputs.append(mask)
    return g.op("DeformConv", *inputs, kernel_shape_i=[kh, kw], strides_i=[sth, stw],
                pads_i=[ph, pw, ph, pw], dilations_i=[dh, dw], group_i=grp,
                offset_group_i=ogrp)


_registered = False


def register_symbolics() -> None:
    """ONNX forms for the ops qdet models use that torch and torchvision do not export
    (torchvision registers RoiAlign itself when imported)."""
    global _registered
    if not _registered:
        import torchvision.ops  # noqa: F401 - registers torchvision's own symbolics

        torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d",
                                               _deform_conv2d_symbolic, 19)
        _registered = True


# --------------------------------------------------------------------------- export


class ExportGraph(nn.Module):
    """What the ONNX graph computes: ``images -> (pred_logits, pred_boxes)``, or with
    ``postprocess``, ``(images, orig_sizes) -> (scores, labels, boxes)``."""

    def __init__(self, model: Detector, postprocess: bool = False, topk: int = 100):
        super().__init__()
        self.model, self.postprocess, self.topk = model, postprocess, topk

    def forward(self, images: Tensor, orig_sizes: Tensor | None = None):
        out = self.model(images)
        if not self.postprocess:
            return out["pred_logits"], out["pred_boxes"]
        return postprocess_batch(out, orig_sizes, self.model.focal, self.topk)


@dataclass
class ImageCheck:
    """One image of a check input: how far onnxruntime is from PyTorch (float32), and how
    far each is from the float64 PyTorch model (largest absolute differences over the
    outputs)."""
    shape: tuple[int, ...]          # the check input's [B,3,H,W]
    index: int                      # the image in that batch
    ort_vs_torch: float
    torch_vs_f64: float             # PyTorch float32's own rounding error
    ort_vs_f64: float
    scale: float                    # largest |output| (float64)

    @property
    def agrees(self) -> bool:
        """onnxruntime is as close to float64 as PyTorch's own float32 is, within a factor 4
        plus 1e-5 + 1e-4 x the output scale (two float32 programs round differently, and a
        model that amplifies rounding amplifies both)."""
        return self.ort_vs_f64 <= 4 * self.torch_vs_f64 + 1e-5 + 1e-4 * self.scale

    def describe(self) -> str:
        return (f"image {self.index} of {'x'.join(map(str, self.shape))}: onnxruntime differs "
                f"from PyTorch by {self.ort_vs_torch:.2g} (outputs up to {self.scale:.3g}); "
                f"from float64 PyTorch by {self.ort_vs_f64:.2g}, where float32 PyTorch is "
                f"{self.torch_vs_f64:.2g} from it")


@dataclass
class ExportReport:
    """What :func:`export` wrote and how close onnxruntime came to PyTorch."""
    path: Path
    arch: str
    opset: int
    dynamic: bool
    postprocess: bool
    size: tuple[int, int]                 # the traced example's (H, W)
    file_mb: float
    export_s: float
    checked: list[tuple[int, ...]] = field(default_factory=list)   # input shapes compared
    max_abs_diff: float = float("nan")
    max_rel_diff: float = float("nan")
    labels_equal: bool = True             # postprocess: every label agrees
    images: list[ImageCheck] = field(default_factory=list)

    @property
    def disagreements(self) -> list[ImageCheck]:
        """The checked images where onnxruntime is further from float64 PyTorch than
        float32 PyTorch's own rounding explains."""
        return [c for c in self.images if not c.agrees]

    def summary(self) -> str:
        axes = "dynamic batch and size" if self.dynamic else \
            f"static 1x3x{self.size[0]}x{self.size[1]}"
        text = (f"{self.path}: {self.arch}, {self.file_mb:.1f} MB, opset {self.opset}, {axes}, "
                f"exported in {self.export_s:.1f} s")
        if self.checked:
            shapes = ", ".join("x".join(map(str, s)) for s in self.checked)
            text += (f"; onnxruntime vs PyTorch on {shapes}, image by image: max abs diff "
                     f"{self.max_abs_diff:.1e}, max rel diff {self.max_rel_diff:.1e}")
            if self.postprocess and not self.labels_equal:
                text += " (some labels differ)"
            bad = self.disagreements
            if bad:
                text += (f"; {len(bad)} of {len(self.images)} images disagree beyond float32 "
                         "rounding: " + "; ".join(c.describe() for c in bad))
            elif self.images:
                own = max(c.torch_vs_f64 for c in self.images)
                text += ("; every image within float32 rounding of the float64 model (float32 "
                         f"PyTorch itself is up to {own:.1e} from it)")
        return text


def default_size(model: Detector) -> tuple[int, int]:
    """The example input's (H, W): the shorter side the model evaluates at, with a 4:3
    longer side where its preprocessing caps the longer side (COCO-style: 800x1066), square
    where it does not (the built-in data)."""
    size, cap = model.preprocess["size"], model.preprocess.get("max_size")
    if cap is None:
        return size, size
    return size, min(cap, size * 4 // 3)


def check_shapes(size: tuple[int, int], dynamic: bool) -> list[tuple[int, int, int, int]]:
    """Inputs on which the file is compared with PyTorch: the traced one, and for a dynamic
    file a second batch size and image size (which a frozen size would get wrong)."""
    h, w = size
    shapes = [(1, 3, h, w)]
    if dynamic:
        shapes.append((2, 3, max(32, h - h // 4), w + w // 4))
    return shapes


def max_diffs(ours, ref) -> tuple[float, float]:
    """Largest ``|a - b|`` and largest ``|a - b| / max(|b|, REL_FLOOR)`` over pairs of
    arrays or tensors."""
    worst_abs = worst_rel = 0.0
    for a, b in zip(ours, ref):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        d = (a - b).abs()
        if d.numel():
            worst_abs = max(worst_abs, d.max().item())
            worst_rel = max(worst_rel, (d / b.abs().clamp(min=REL_FLOOR)).max().item())
    return worst_abs, worst_rel


def _example(shape, postprocess: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(*shape, generator=g)
    if not postprocess:
        return (images,)
    b, _, h, w = shape
    # original sizes unlike the input's, as after evaluation's resize
    orig = torch.tensor([[h * 3 // 2 + 7 * i, w * 3 // 2 + 5 * i] for i in range(b)])
    return images, orig


@contextlib.contextmanager
def _stdout_discarded():
    """The TorchScript exporter prints the whole graph to stdout (from C++, its log being
    always on) when an op has no ONNX form; the error raised instead says what matters in
    one line. File descriptor 1 points at /dev/null meanwhile, so anything else printed to
    stdout during the export is lost too (``qdet export`` shows its spinner on stderr)."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)   # C stdio's buffer, before fd 1 is restored
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _unsupported_op(message: str) -> str:
    for pattern in (r"operator '([^']+)'", r"unrecognized namespace ([\w:.]+?)\.\s"):
        m = re.search(pattern, message)
        if m:
            return m.group(1)
    return message.splitlines()[0] if message else "an operator"


def export(model: Detector, path: str | os.PathLike, opset: int | None = None,
           size: Sequence[int] | None = None, dynamic: bool = True, postprocess: bool = False,
           topk: int | None = None, check: bool = True,
           metadata: dict | None = None) -> ExportReport:
    """Export ``model`` (eval mode, CPU) to the ONNX file ``path``, written atomically.

    Args:
        opset: ONNX opset (default 19; at least 16; Dynamic DETR's DeformConv needs 19).
        size: ``(H, W)`` of the traced example (default :func:`default_size`); with
            ``dynamic=False`` the only input size the file accepts, at batch 1.
        dynamic: batch, height and width dynamic axes.
        postprocess: scores, labels and boxes in pixels instead of the raw outputs.
        topk: focal models' number of detections per image with ``postprocess`` (default:
            the model's, 100; DINO 300).
        check: run the file in onnxruntime on :func:`check_shapes` and compare with the
            model (``ExportReport.max_abs_diff`` / ``max_rel_diff``).
        metadata: more ``metadata_props`` (values JSON-encoded unless strings).
    Raises:
        ExportError: a one-line message naming the method and the op that has no ONNX form.
    """
    onnx = require("onnx")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    arch = model.arch
    if opset < MIN_OPSET:
        raise ExportError(f"{arch}: opset {opset} is too old; qdet exports need opset >= "
                          f"{MIN_OPSET} (GridSample, RoiAlign with half_pixel)")
    h, w = (int(v) for v in (size or default_size(model)))
    if h < 32 or w < 32:
        raise ExportError(f"{arch}: example size {h}x{w} is too small; use at least 32x32")
    if model_device(model).type != "cpu":
        raise ExportError(f"{arch}: export runs on the CPU; move the model there first "
                          "(model.cpu())")
    register_symbolics()
    model = model.eval()
    # eval mode on the wrapper too: the exporter restores the wrapper's mode afterwards,
    # recursively, which would otherwise leave the model in training mode
    topk = model.max_detections if topk is None else topk
    graph = ExportGraph(model, postprocess, topk).eval()
    args = _example((1, 3, h, w), postprocess)
    inputs = ["images", "orig_sizes"][:len(args)]
    outputs = list(POST_OUTPUTS if postprocess else RAW_OUTPUTS)
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"},
                **{name: {0: "batch"} for name in inputs[1:] + outputs}}
    buf = io.BytesIO()
    t0 = time.perf_counter()
    with export_mode(), warnings.catch_warnings():
        # loops over levels and layers are fixed by the model; what a frozen size would get
        # wrong, the check below measures at another batch and size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        try:
            with _stdout_discarded():
                torch.onnx.export(graph, args, buf, dynamo=False, opset_version=opset,
                                  input_names=inputs, output_names=outputs,
                                  dynamic_axes=axes, do_constant_folding=True)
        except torch.onnx.errors.UnsupportedOperatorError as e:
            op = _unsupported_op(str(e))
            need = OP_OPSET.get(op)
            hint = (f"it needs opset >= {need}: pass --opset {need}" if need and opset < need
                    else "no ONNX form of it is known")
            raise ExportError(f"{arch}: the op {op} cannot be exported to ONNX opset {opset} "
                              f"({hint})") from None
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"{arch}: ONNX export failed: {first}") from e
    export_s = time.perf_counter() - t0
    proto = onnx.load_from_string(buf.getvalue())
    props = {"qdet.format": FORMAT, "qdet.arch": arch, "qdet.focal": json.dumps(model.focal),
             "qdet.class_names": json.dumps(list(model.class_names)),
             "qdet.category_ids": json.dumps([int(c) for c in model.category_ids]),
             "qdet.preprocess": json.dumps(dict(model.preprocess)),
             "qdet.config": json.dumps(_config_dict(model)),
             "qdet.outputs": "postprocess" if postprocess else "raw",
             "qdet.topk": str(topk), "qdet.dynamic": json.dumps(dynamic),
             "qdet.size": f"{h}x{w}"}
    for key, value in (metadata or {}).items():
        props[key] = value if isinstance(value, str) else json.dumps(value)
    onnx.helper.set_model_props(proto, props)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    report = ExportReport(path, arch, opset, dynamic, postprocess, (h, w),
                          path.stat().st_size / 2**20, export_s)
    if check:
        _check(report, graph)
    return report


def _config_dict(model: Detector) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(model.config) if is_dataclass(model.config) else {}


def _float64_twin(graph: ExportGraph) -> ExportGraph | None:
    """The same graph in float64, as the reference both float32 programs are measured
    against (None where the model cannot run in float64)."""
    try:
        twin = copy.deepcopy(graph).double()
    except (RuntimeError, TypeError):
        return None
    return twin


def _check(report: ExportReport, graph: ExportGraph) -> None:
    """Run the file in onnxruntime on :func:`check_shapes` and compare with the model image
    by image, and each against the float64 model: rounding that a model amplifies (random
    weights, a box near a pyramid level boundary) shows in float32 PyTorch too, while a
    wrong op shows in onnxruntime alone."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    twin = _float64_twin(graph)
    worst_abs = worst_rel = 0.0
    for i, shape in enumerate(check_shapes(report.size, report.dynamic)):
        args = _example(shape, report.postprocess, seed=i + 1)
        with torch.no_grad():
            ref = graph(*args)
            ref64 = None
            if twin is not None:
                ref64 = twin(*[a.double() if a.is_floating_point() else a for a in args])
        ours = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
        if report.postprocess:
            report.labels_equal &= bool((torch.from_numpy(ours[1]) == ref[1]).all())
            ours, ref = [ours[0], ours[2]], [ref[0], ref[2]]
            ref64 = None if ref64 is None else [ref64[0], ref64[2]]
        for b in range(shape[0]):
            mine = [torch.as_tensor(o[b]) for o in ours]
            theirs = [r[b] for r in ref]
            a, r = max_diffs(mine, theirs)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            if ref64 is not None:
                exact = [r[b] for r in ref64]
                report.images.append(ImageCheck(
                    tuple(shape), b, a, max_diffs(theirs, exact)[0], max_diffs(mine, exact)[0],
                    max(float(t.abs().max()) for t in exact if t.numel())))
        report.checked.append(shape)
    report.max_abs_diff, report.max_rel_diff = worst_abs, worst_rel


def export_weights(weights: str | os.PathLike, out: str | os.PathLike | None = None,
                   **options) -> ExportReport:
    """``qdet export``: load ``weights`` (anything ``qdet.load`` reads: a file, an HF model
    folder, a zoo name or an ``hf:`` id; BN folded, which changes no output) and
    :func:`export` it to ``out`` (default: beside a weights file with the suffix .onnx, else
    ``<name>.onnx`` in the current folder), with a qdet checkpoint's data description in the
    metadata so that ``qdet eval`` finds the data it trained on."""
    from ..blocks.fast import optimize_for_inference
    from .loading import build, read_weights
    from .zoo import resolve

    if str(weights).lower().endswith(".onnx"):
        raise ExportError(f"{weights} is already an ONNX file; pass the checkpoint it came "
                          "from")
    path = resolve(weights)
    model = optimize_for_inference(build(read_weights(path)))
    info = model.data_info
    meta = {"qdet.data": info.get("data") or None,
            "qdet.shapes": (info.get("train") or {}).get("shapes")}
    if out is None:
        given = Path(weights)
        out = given.with_suffix(".onnx") if given.is_file() else Path(path.name).with_suffix(
            ".onnx")
    return export(model, Path(out), metadata={k: v for k, v in meta.items() if v is not None},
                  **options)
