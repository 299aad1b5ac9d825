"""ONNX files written by ``qdet export``, run by onnxruntime with a qdet model's interface.

:class:`OnnxDetector` is what ``qdet.load`` returns for a ``.onnx`` path, so ``qdet predict``
and ``qdet eval`` score an exported file with the same code as the original. The file's
metadata (``qdet.*`` properties, written by ``qdet.weights.onnx_export``) carries the
architecture, head kind, class names, category ids, preprocessing and the checkpoint's data
description.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

FORMAT = "qdet-onnx-1"
RAW_OUTPUTS = ("pred_logits", "pred_boxes")
POST_OUTPUTS = ("scores", "labels", "boxes")


class ExportError(ValueError):
    """A model that cannot be exported as asked, or a file that is no qdet export; the
    message is one line."""


def require(module: str):
    """Import ``module`` (onnx, onnxruntime), or say in one line how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install 'qdet[export]' "
                          "(onnx and onnxruntime)") from None


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
        ort = require("onnxruntime")
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
        self.max_detections = int(meta.get("qdet.topk", 100))
        self.input_shape = list(self.session.get_inputs()[0].shape)  # ints where static
        # what a qdet checkpoint says about its data (``qdet eval`` reads it)
        shapes = meta.get("qdet.shapes")
        self.data_info = {"data": json.loads(meta.get("qdet.data", "null")) or {},
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
