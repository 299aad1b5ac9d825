"""ONNX export of every qdet method, and the exported file run by onnxruntime.

``export(model, path)`` traces the model into one ONNX graph:

- input ``images``: float32 ``[B,3,H,W]``, normalized as evaluation does (the file's
  metadata carries the resize: ``preprocess``);
- outputs ``pred_logits`` ``[B,Q,C(+1)]`` and ``pred_boxes`` ``[B,Q,4]`` (normalized cx, cy,
  w, h), as ``model(images)`` returns them; or, with ``postprocess=True``, a second input
  ``orig_sizes`` int64 ``[B,2]`` (h, w of each original image) and the outputs ``scores``
  ``[B,K]``, ``labels`` ``[B,K]`` (int64) and ``boxes`` ``[B,K,4]`` (pixels of the original
  image, x0 y0 x1 y1): ``qdet.base.postprocess`` in the graph (softmax models: K = Q;
  focal models: the top ``topk`` (query, class) pairs);
- B, H and W dynamic by default (``dynamic=False``: fixed to the traced example);
- ``metadata_props``: arch, head kind, class names, category ids, preprocess, config, and
  the checkpoint's data description, so a file is evaluated and drawn with no other input.

The exporter is torch's TorchScript-based one (``dynamo=False``): it exports all seven
methods with dynamic B/H/W in about a second per tiny model, where the torch.export-based
one took 10-20 s and wrote an Anchor DETR graph onnxruntime refused. While tracing,
``qdet.base.exporting()`` is True and layers take their traceable formulations (sizes stay
tensors; deformable attention is the grid_sample formulation; Sparse R-CNN's RoIAlign is
ONNX RoiAlign with ``half_pixel``, which is torchvision's ``aligned=True``, opset 16); the
symbolic registered here maps torchvision's deformable convolution (Dynamic DETR) to ONNX
DeformConv (opset 19), which onnxruntime runs.

:class:`OnnxDetector` runs such a file with a qdet model's interface (``qdet.load`` returns
one for a ``.onnx`` path), so ``qdet predict`` and ``qdet eval`` score it with the same code
as the original.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import Detector, export_mode, model_device, postprocess_batch

FORMAT = "qdet-onnx-1"
DEFAULT_OPSET = 19
MIN_OPSET = 16          # GridSample, RoiAlign with half_pixel
# ops whose ONNX form needs a newer opset than MIN_OPSET
OP_OPSET = {"torchvision::deform_conv2d": 19}
# |a - b| / max(|b|, REL_FLOOR): relative where values are not tiny, absolute below
REL_FLOOR = 0.1
RAW_OUTPUTS = ("pred_logits", "pred_boxes")
POST_OUTPUTS = ("scores", "labels", "boxes")


class ExportError(ValueError):
    """A model that cannot be exported as asked, or a file that is no qdet export; the
    message is one line."""


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install 'qdet[export]' "
                          "(onnx and onnxruntime)") from None


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

    def summary(self) -> str:
        axes = "dynamic batch and size" if self.dynamic else \
            f"static 1x3x{self.size[0]}x{self.size[1]}"
        text = (f"{self.path}: {self.arch}, {self.file_mb:.1f} MB, opset {self.opset}, {axes}, "
                f"exported in {self.export_s:.1f} s")
        if self.checked:
            shapes = ", ".join("x".join(map(str, s)) for s in self.checked)
            text += (f"; onnxruntime vs PyTorch on {shapes}: max abs diff "
                     f"{self.max_abs_diff:.1e}, max rel diff {self.max_rel_diff:.1e}")
            if self.postprocess and not self.labels_equal:
                text += " (some labels differ)"
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
           topk: int = 100, check: bool = True, metadata: dict | None = None) -> ExportReport:
    """Export ``model`` (eval mode, CPU) to the ONNX file ``path``, written atomically.

    Args:
        opset: ONNX opset (default 19; at least 16; Dynamic DETR's DeformConv needs 19).
        size: ``(H, W)`` of the traced example (default :func:`default_size`); with
            ``dynamic=False`` the only input size the file accepts, at batch 1.
        dynamic: batch, height and width dynamic axes.
        postprocess: scores, labels and boxes in pixels instead of the raw outputs.
        topk: focal models' number of detections per image with ``postprocess``.
        check: run the file in onnxruntime on :func:`check_shapes` and compare with the
            model (``ExportReport.max_abs_diff`` / ``max_rel_diff``).
        metadata: more ``metadata_props`` (values JSON-encoded unless strings).
    Raises:
        ExportError: a one-line message naming the method and the op that has no ONNX form.
    """
    onnx = _require("onnx")
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
    _save_atomic(onnx, proto, path)
    report = ExportReport(path, arch, opset, dynamic, postprocess, (h, w),
                          path.stat().st_size / 2**20, export_s)
    if check:
        _check(report, graph)
    return report


def _config_dict(model: Detector) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(model.config) if is_dataclass(model.config) else {}


def _save_atomic(onnx, proto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check(report: ExportReport, graph: ExportGraph) -> None:
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst_abs = worst_rel = 0.0
    for i, shape in enumerate(check_shapes(report.size, report.dynamic)):
        args = _example(shape, report.postprocess, seed=i + 1)
        with torch.no_grad():
            ref = graph(*args)
        ours = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
        if report.postprocess:
            report.labels_equal &= bool((torch.from_numpy(ours[1]) == ref[1]).all())
            ours, ref = [ours[0], ours[2]], [ref[0], ref[2]]
        a, r = max_diffs(ours, ref)
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        report.checked.append(shape)
    report.max_abs_diff, report.max_rel_diff = worst_abs, worst_rel


def export_weights(weights: str | os.PathLike, out: str | os.PathLike | None = None,
                   **options) -> ExportReport:
    """``qdet export``: load ``weights`` (anything ``qdet.load`` reads: a file, an HF model
    folder, a zoo name or an ``hf:`` id; BN folded, which changes no output) and
    :func:`export` it to ``out`` (default: beside a weights file with the suffix .onnx, else
    ``<name>.onnx`` in the current folder), with a qdet checkpoint's data description in the
    metadata so that ``qdet eval`` finds the data it trained on."""
    from .checkpoint import model_from_checkpoint, model_from_hf_folder, read_checkpoint
    from .fast import optimize_for_inference
    from .zoo import resolve

    if str(weights).lower().endswith(".onnx"):
        raise ExportError(f"{weights} is already an ONNX file; pass the checkpoint it came "
                          "from")
    path = resolve(weights)
    meta = {}
    if path.is_dir():
        model = model_from_hf_folder(path)
    else:
        ckpt = read_checkpoint(path)
        model = model_from_checkpoint(ckpt, str(path))
        meta = {"qdet.data": ckpt.get("data"),
                "qdet.shapes": (ckpt.get("train") or {}).get("shapes")}
    model = optimize_for_inference(model)
    if out is None:
        given = Path(weights)
        out = given.with_suffix(".onnx") if given.is_file() else Path(path.name).with_suffix(
            ".onnx")
    return export(model, Path(out), metadata={k: v for k, v in meta.items() if v is not None},
                  **options)


# ------------------------------------------------------------------ running the file


class OnnxDetector(nn.Module):
    """An ONNX file written by :func:`export` (raw outputs), run by onnxruntime with the
    interface of a qdet model: ``arch``, ``focal``, ``class_names``, ``category_ids`` and
    ``preprocess`` from the file's metadata, and ``model(images)`` -> ``pred_logits``,
    ``pred_boxes`` for a normalized ``[B,3,H,W]`` tensor or a list of ``[3,H,W]`` tensors.

    The graph has no padding-mask input, so images of different sizes run in groups of
    equal size (a padded batch in PyTorch gives the same detections up to float rounding).
    A static file takes only its traced size, one image at a time. It has no parameters and
    returns CPU tensors.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 threads: int | None = None):
        super().__init__()
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {str(self.path)!r} not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ExportError(f"{self.path}: this onnxruntime has no CUDA support "
                                  "(pip install onnxruntime-gpu) ; use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            hint = ("; Dynamic DETR needs an onnxruntime with a DeformConv kernel (qdet is "
                    "tested with 1.32)" if "DeformConv" in str(e) else "")
            raise ExportError(f"{self.path}: onnxruntime cannot load it "
                              f"({str(e).splitlines()[0]}){hint}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("qdet.format") != FORMAT:
            raise ExportError(f"{self.path}: not an ONNX file written by `qdet export` (no "
                              "qdet metadata); export the checkpoint with qdet")
        self.metadata = dict(meta)
        self.arch = meta["qdet.arch"]
        self.focal = json.loads(meta["qdet.focal"])
        self.class_names = json.loads(meta["qdet.class_names"])
        self.category_ids = json.loads(meta["qdet.category_ids"])
        self.preprocess = json.loads(meta["qdet.preprocess"])
        self.postprocessed = meta.get("qdet.outputs") == "postprocess"
        self.input_shape = list(self.session.get_inputs()[0].shape)  # ints where static
        # what a qdet checkpoint says about its data (``qdet eval`` reads it)
        shapes = meta.get("qdet.shapes")
        self.checkpoint_info = {"data": json.loads(meta.get("qdet.data", "null")) or {},
                                "train": {"shapes": json.loads(shapes)} if shapes else {}}

    def forward(self, images) -> dict:
        if self.postprocessed:
            raise ExportError(f"{self.path} was exported with --postprocess (scores, labels, "
                              "boxes); predict and eval need the raw outputs: export again "
                              "without it, or call .session.run directly")
        if isinstance(images, Tensor):
            return self._run(images[None] if images.dim() == 3 else images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[-2:]), []).append(i)
        logits: list = [None] * len(images)
        boxes: list = [None] * len(images)
        for idx in groups.values():
            out = self._run(torch.stack([images[i] for i in idx]))
            for j, i in enumerate(idx):
                logits[i], boxes[i] = out["pred_logits"][j], out["pred_boxes"][j]
        return {"pred_logits": torch.stack(logits), "pred_boxes": torch.stack(boxes)}

    def _run(self, x: Tensor) -> dict:
        fixed = [(d, want) for d, want in zip(x.shape[1:], self.input_shape[1:])
                 if isinstance(want, int) and d != want]
        if fixed:
            shape = "x".join(str(v) for v in self.input_shape)
            raise ExportError(f"{self.path} takes only {shape} inputs (a static export), got "
                              f"{'x'.join(map(str, x.shape))}: export with --dynamic, or at "
                              "the size of these images")
        if isinstance(self.input_shape[0], int) and x.shape[0] != self.input_shape[0]:
            outs = [self._run(x[i:i + 1]) for i in range(x.shape[0])]
            return {k: torch.cat([o[k] for o in outs]) for k in RAW_OUTPUTS}
        feed = {"images": x.detach().float().cpu().contiguous().numpy()}
        logits, boxes = self.session.run(list(RAW_OUTPUTS), feed)
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}
