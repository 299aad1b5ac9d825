"""Switches that pick how an op is computed, read by ops and layers alike: the export mode
(traceable formulations while a model goes to ONNX) and whether bfloat16 is native."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_export_mode = False


def exporting() -> bool:
    """True while a model is traced for ONNX (``qdet.export``, ``torch.onnx.export``) or
    inside :func:`export_mode`. Layers then take their traceable formulation: sizes stay
    tensors (so the graph keeps them dynamic), no branch depends on data or sizes, and ops
    without an ONNX form (Numba kernels) give way to pure-PyTorch equivalents with the same
    outputs."""
    return _export_mode or torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """Run models with their export-time formulations (see :func:`exporting`), e.g. to
    compare them with the ordinary ones in PyTorch."""
    global _export_mode
    before, _export_mode = _export_mode, True
    try:
        yield
    finally:
        _export_mode = before


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 runs natively (else autocast would emulate it, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: no cheap way to know
        return False
