"""``qdet explain``: the command over :func:`qdet.explain` (torch and the models are imported
inside the command, so that ``qdet --help`` stays fast)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..common.terminal import console, err
from .common import Device, fail, find_weights, load_model, pick_device


def parse_layers(text: str) -> list[int] | None:
    """``all`` -> None (every layer); ``2`` or ``0,-1`` -> those indices."""
    if text.strip().lower() == "all":
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        fail(f"--layer expects an index (negative counts from the last), a comma-separated "
             f"list or 'all', got {text!r}")


def parse_position(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--encoder expects a pixel position X,Y (e.g. 120,80), got {text!r}")
    return x, y


def explain_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    weights: Annotated[Optional[str], typer.Option(
        help="Weights: a checkpoint file, a Hugging Face model folder, a zoo name (`qdet zoo`) "
             "or hf:owner/name (not an ONNX file: explain hooks the PyTorch layers); default: "
             "best.pt of the most recent run under ./runs.")] = None,
    top: Annotated[Optional[int], typer.Option(help="Explain the K highest-scoring queries "
                                               "(default 3).", metavar="K")] = None,
    query: Annotated[Optional[list[int]], typer.Option(
        "--query", "-q", help="Explain this query instead (repeatable).")] = None,
    layer: Annotated[str, typer.Option(help="Decoder layer (stage) to show: an index "
                                       "(negative from the last), a list 0,2 or 'all'.")
                     ] = "all",
    heads: Annotated[bool, typer.Option("--heads", help="Draw every attention head (or "
                                        "every head's sampling points) instead of their "
                                        "mean.")] = False,
    encoder: Annotated[Optional[str], typer.Option(help="X,Y: also show the encoder "
                                                   "self-attention of this pixel (DETR, "
                                                   "Conditional DETR).")] = None,
    save: Annotated[Optional[Path], typer.Option(help="Where to write the figure (PNG); "
                                                 "default explain/IMAGE_explain.png.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the explanation as JSON "
                                          "instead of tables.")] = False,
    device: Device = None,
):
    """Where each detection's query looks in IMAGE, layer by layer, and which part of its
    attention decides: DETR's four logit terms, Conditional DETR's content and spatial terms,
    Anchor DETR's row and column attention, the deformable methods' sampling points, Sparse
    R-CNN's and Dynamic DETR's boxes per stage. Writes one figure and prints a table per
    object."""
    from ..data.errors import DataError
    from ..data.images import load_image
    from ..tools.explain import explain
    from ..tools.explain_view import figure, render, save_figure, to_json

    if not image.is_file():
        fail(f"image {image} not found")
    if top is not None and query:
        fail("give --top or --query, not both")
    if top is not None and top < 1:
        fail(f"--top must be at least 1, got {top}")
    layers, position = parse_layers(layer), parse_position(encoder)
    path = find_weights(weights)
    if path.suffix.lower() == ".onnx":
        fail("explain needs the PyTorch model (it hooks its attention layers): pass the "
             "checkpoint the ONNX file was exported from")
    model = load_model(path, pick_device(device))
    try:
        picture = load_image(image)
    except DataError as e:
        fail(str(e))
    try:
        result = explain(model, picture, top=top or 3, queries=query, layers=layers,
                         encoder=position)
    except ValueError as e:
        fail(str(e))
    save = save or Path("explain") / f"{image.stem}_explain.png"
    save_figure(figure(result, heads=heads), save)
    if as_json:
        print(json.dumps({"image": str(image), **to_json(result)}))
        err.print(f"figure saved to {save}")
    else:
        render(result, console)
        console.print(f"figure saved to {save}")
