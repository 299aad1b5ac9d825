"""``qdet export``: a checkpoint to an ONNX file, checked in onnxruntime (registered on the
app in ``qdet.cli.app``; torch and the models are imported inside the command)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from ..common.terminal import console, err
from .common import fail


def parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``HxW`` -> ``(H, W)``."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"--size must look like 800x1066 (height x width), got {text!r}")
    return h, w


def export_cmd(
    weights: Annotated[str, typer.Argument(help="Weights: anything qdet.load reads (a "
                                           "checkpoint file, a Hugging Face model folder, "
                                           "a zoo name or hf:owner/name).")],
    out: Annotated[Optional[Path], typer.Option(help="ONNX file to write (default: WEIGHTS "
                                                "with the suffix .onnx).")] = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default 19, at least 16; "
                                                 "Dynamic DETR's DeformConv needs 19).")] = None,
    size: Annotated[Optional[str], typer.Option(help="Example input HxW to trace and check "
                                                "at; with --static the only size the file "
                                                "takes. Default: the model's evaluation "
                                                "size (800x1066 for COCO-style models).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic/--static", help="Dynamic batch, height "
                                          "and width, or fixed to 1x3xHxW.")] = True,
    postprocess: Annotated[bool, typer.Option("--postprocess", help="Output scores, labels "
                                              "and boxes in pixels of the original image "
                                              "(a second input orig_sizes [B,2] as h, w) "
                                              "instead of pred_logits and pred_boxes; "
                                              "predict and eval need the raw outputs.")] = False,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare onnxruntime with "
                                        "PyTorch on the example and, when dynamic, on "
                                        "another batch and size.")] = True,
):
    """Export a checkpoint to ONNX (input `images` [B,3,H,W] normalized as evaluation does;
    outputs `pred_logits`, `pred_boxes`), with class names, category ids and preprocessing
    in its metadata, and check it in onnxruntime. `qdet predict --weights F.onnx` and
    `qdet eval F.onnx` run the file."""
    from ..weights.checkpoint import CheckpointError
    from ..weights.onnx_export import ExportError, export_weights
    from ..weights.zoo import ZooError

    hw = parse_size(size)
    report = error = None
    # a spinner on stderr: while tracing, stdout is closed to the exporter's graph dumps
    with err.status(f"exporting {weights}: tracing"
                    + (", then checking in onnxruntime" if check else "")):
        try:
            report = export_weights(weights, out, opset=opset, size=hw, dynamic=dynamic,
                                    postprocess=postprocess, check=check)
        except (ExportError, CheckpointError, ZooError, FileNotFoundError, ValueError) as e:
            error = str(e)
    if error is not None:
        fail(error)          # after the spinner has stopped, so that the error is one line
    console.print(report.summary(), highlight=False, soft_wrap=True)
    if report.disagreements:
        err.print(Text("warning: ", style="yellow") + Text(
            "onnxruntime's outputs differ from PyTorch's by more than float32 rounding "
            "explains on the images above: a wrong op, or outputs on a discontinuity (a box "
            "on a pyramid level boundary, amplified by later stages); score the file with "
            "`qdet eval FILE.onnx` on your data before relying on it"), soft_wrap=True)
