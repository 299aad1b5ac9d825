"""qdet: query-based object detectors (DETR family) in one small package.

>>> import qdet
>>> model = qdet.load("detr-r50-e632da11.pth")      # qdet or official release checkpoint
>>> outputs = model(images)                          # pred_logits, pred_boxes, aux_outputs
>>> found = qdet.detect(model, [pil_image])          # thresholded detections in pixels
>>> objects = qdet.explain(model, "photo.jpg")      # where each detection's query looks
>>> qdet.export(model, "model.onnx")                 # ONNX, checked in onnxruntime

The names listed in ``__all__`` are the stable API; the subpackages (``qdet.ops``,
``qdet.blocks``, ``qdet.models``, ``qdet.weights``, ``qdet.data``, ``qdet.engine``,
``qdet.tools``, ``qdet.cli``, ``qdet.common``) may still move things between modules.
"""
import importlib

__version__ = "0.1.0"

# Where each public name lives. They are imported on first use, so that `import qdet` (and
# with it `qdet --help`) loads neither torch nor numba. No subpackage has the name of a
# function exported here: importing it would replace the function.
_LAZY = {
    "load": "weights.loading", "build_model": "models.registry", "ARCHS": "models.registry",
    "ms_deform_attn": "ops.deform_attn", "deform_conv2d": "ops.deform_conv",
    "DeformConv2d": "ops.deform_conv", "roi_align": "ops.roi_align",
    "postprocess": "blocks.base", "optimize_for_inference": "blocks.fast",
    "explain": "tools.explain", "export": "weights.onnx_export",
    "OnnxDetector": "weights.onnx_runtime", "detect": "engine.predict", "fit": "engine.runs",
    "evaluate": "engine.evaluation", "write_report": "engine.eval_report",
    "compare_runs": "engine.compare",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qdet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
