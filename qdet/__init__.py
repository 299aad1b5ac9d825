"""qdet: query-based object detectors (DETR family) in one small package.

>>> import qdet
>>> model = qdet.load("detr-r50-e632da11.pth")      # qdet or official release checkpoint
>>> outputs = model(images)                          # pred_logits, pred_boxes, aux_outputs
>>> objects = qdet.explain(model, "photo.jpg")      # where each detection's query looks
>>> qdet.export(model, "model.onnx")                 # ONNX, checked in onnxruntime
"""
import importlib

__version__ = "0.1.0"
__all__ = ["ARCHS", "build_model", "explain", "export", "load", "ms_deform_attn"]

# Where each public name lives. They are imported on first use, so that `import qdet` (and
# with it `qdet --help`, which imports qdet.cli) loads neither torch nor numba. No module
# has the name of a function exported here: importing it would replace the function.
_LAZY = {"load": "checkpoint", "build_model": "registry", "ARCHS": "registry",
         "ms_deform_attn": "deform_attn", "explain": "explainer", "export": "onnx_export"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qdet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
