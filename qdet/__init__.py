"""qdet: query-based object detectors (DETR family) in one small package.

>>> import qdet
>>> model = qdet.load("detr-r50-e632da11.pth")      # qdet or official release checkpoint
>>> outputs = model(images)                          # pred_logits, pred_boxes, aux_outputs
>>> objects = qdet.explain(model, "photo.jpg")      # where each detection's query looks
>>> qdet.export(model, "model.onnx")                 # ONNX, checked in onnxruntime
"""
from .checkpoint import load
from .deform_attn import ms_deform_attn
from .explain import explain
from .export import export
from .registry import ARCHS, build_model

__version__ = "0.1.0"
__all__ = ["ARCHS", "build_model", "explain", "export", "load", "ms_deform_attn"]
