"""Benchmarks of ONNX export (``qdet bench export``, ``qdet bench deform-attn-onnx``): each
method's file in onnxruntime against qdet's fast path, and the formulations of deformable
attention in onnxruntime. The shared measuring tools are in ``qdet.tools.bench``."""
from __future__ import annotations

import time

import torch

from .bench import deform_attn_inputs, random_images, time_it

# Deformable DETR's levels at an 800x1066 input (strides 8..64)
LEVELS_800x1066 = [(100, 134), (50, 67), (25, 34), (13, 17)]


def _onnx_session(path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()   # as many as torch's
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_export(arch: str, size: tuple[int, int] = (800, 1066), repeat: int = 3,
                 overrides: dict | None = None) -> dict:
    """``arch``'s paper configuration (random weights): its export time and file size, and
    inference at batch 1 of the file in onnxruntime (CPU, as many threads as torch) against
    qdet's fast path in float32, in the same process, with the largest output difference.
    For scale, ``noise_rel_diff`` is how far PyTorch's own outputs move when the input is
    multiplied by 1 + 1e-6 noise: random paper-size weights can be ill-conditioned (Dynamic
    DETR's refined boxes grow to hundreds of image sizes), and there float rounding alone
    moves outputs as far as onnxruntime does."""
    import tempfile
    from pathlib import Path

    from ..blocks.fast import optimize_for_inference
    from ..models.registry import build_model
    from ..weights.onnx_export import export, max_diffs

    dev = torch.device("cpu")
    torch.manual_seed(0)
    model = optimize_for_inference(build_model(arch, overrides).eval())
    x = torch.stack(random_images(1, size, dev))
    with tempfile.TemporaryDirectory() as tmp:
        report = export(model, Path(tmp) / f"{arch}.onnx", size=size, check=False)
        t0 = time.perf_counter()
        session = _onnx_session(report.path)
        load_s = time.perf_counter() - t0

        def fast(inp):
            with torch.inference_mode():
                out = model(inp)
            return out["pred_logits"], out["pred_boxes"]

        feed = {"images": x.numpy()}
        names = ["pred_logits", "pred_boxes"]
        ref = fast(x)
        abs_diff, rel_diff = max_diffs(session.run(names, feed), ref)
        g = torch.Generator().manual_seed(1)
        noise_rel = max_diffs(fast(x * (1 + 1e-6 * torch.randn(x.shape, generator=g))), ref)[1]
        fast_s = time_it(lambda: fast(x), dev, repeat)
        ort_s = time_it(lambda: session.run(names, feed), dev, repeat)
    return {"arch": arch, "export_s": report.export_s, "file_mb": report.file_mb,
            "load_s": load_s, "fast_s": fast_s, "onnxruntime_s": ort_s,
            "speedup": fast_s / ort_s, "max_abs_diff": abs_diff, "max_rel_diff": rel_diff,
            "noise_rel_diff": noise_rel}


def _msda_gather(value, shapes, loc, attn):
    """A gather formulation of deformable attention (the candidate measured against
    grid_sample): each bilinear corner's rows gathered from the flattened values and summed
    with its weights by a batched matmul."""
    n, s, m, d = value.shape
    _, lq, _, nl, p, _ = loc.shape
    v = value.transpose(1, 2).reshape(n * m * s, d)                      # rows (n, m, s)
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=loc.dtype)
    start = torch.tensor([0] + [h * w for h, w in shapes[:-1]]).cumsum(0)
    xy = loc.permute(0, 2, 1, 3, 4, 5) * wh[:, None, :] - 0.5             # [N,M,Lq,L,P,2]
    xy0 = xy.floor()
    frac = xy - xy0
    base = (torch.arange(n * m) * s).view(n, m, 1, 1, 1) + start.view(1, 1, 1, nl, 1)
    a = attn.permute(0, 2, 1, 3, 4)                                       # [N,M,Lq,L,P]
    ww, hh = wh[:, 0].view(1, 1, 1, nl, 1), wh[:, 1].view(1, 1, 1, nl, 1)
    out = 0
    for dx in (0, 1):
        for dy in (0, 1):
            cx, cy = xy0[..., 0] + dx, xy0[..., 1] + dy
            wgt = ((frac[..., 0] if dx else 1 - frac[..., 0])
                   * (frac[..., 1] if dy else 1 - frac[..., 1]))
            inside = (cx >= 0) & (cx < ww) & (cy >= 0) & (cy < hh)
            idx = base + (cy.clamp(min=0).minimum(hh - 1) * ww
                          + cx.clamp(min=0).minimum(ww - 1)).long()
            wgt = torch.where(inside, wgt * a, torch.zeros_like(wgt))
            rows = v.index_select(0, idx.reshape(-1)).view(n * m * lq, nl * p, d)
            out = out + torch.bmm(wgt.reshape(n * m * lq, 1, nl * p), rows)
    return out.view(n, m, lq, d).permute(0, 2, 1, 3).reshape(n, lq, m * d)


class _Msda(torch.nn.Module):
    def __init__(self, fn, shapes):
        super().__init__()
        self.fn, self.shapes = fn, shapes

    def forward(self, value, loc, attn):
        return self.fn(value, self.shapes, loc, attn)


def bench_deform_attn_onnx(repeat: int = 5, levels=LEVELS_800x1066) -> list[dict]:
    """Deformable attention in onnxruntime, formulated three ways, at Deformable DETR's
    800x1066 shapes (batch 1, 8 heads x 32, 4 points; encoder: every pixel a query;
    decoder: 300): grid_sample with every level's samples stacked (the reference),
    grid_sample with each level summed as it goes (what qdet exports, marked *), and a
    gather of each bilinear corner; qdet's Numba kernel in PyTorch for scale."""
    import tempfile
    import warnings
    from pathlib import Path

    from ..ops.deform_attn import ms_deform_attn, ms_deform_attn_onnx, ms_deform_attn_torch

    dev = torch.device("cpu")
    forms = {"grid_sample, stacked": ms_deform_attn_torch,
             "grid_sample, summed *": ms_deform_attn_onnx,
             "gather": _msda_gather}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape, nq in (("encoder", None), ("decoder", 300)):
            (value, loc, attn), lv = deform_attn_inputs(nq, dev, batch=1, levels=levels)
            ref = ms_deform_attn_torch(value, lv, loc, attn)
            feed = {"value": value.numpy(), "loc": loc.numpy(), "attn": attn.numpy()}
            for name, fn in forms.items():
                path = Path(tmp) / "msda.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(_Msda(fn, lv), (value, loc, attn), path, dynamo=False,
                                      opset_version=17, input_names=list(feed))
                session = _onnx_session(path)
                got = torch.from_numpy(session.run(None, feed)[0])
                rows.append({"shape": shape, "queries": loc.shape[1], "formulation": name,
                             "seconds": time_it(lambda: session.run(None, feed), dev, repeat),
                             "max_abs_diff": (got - ref).abs().max().item()})
            with torch.no_grad():
                kernel = lambda: ms_deform_attn(value, lv, None, loc, attn)  # noqa: E731
                rows.append({"shape": shape, "queries": loc.shape[1],
                             "formulation": "numba (PyTorch)",
                             "seconds": time_it(kernel, dev, repeat),
                             "max_abs_diff": (kernel() - ref).abs().max().item()})
    for row in rows:
        used = next(r for r in rows
                    if r["shape"] == row["shape"] and r["formulation"].endswith("*"))
        row["speedup"] = used["seconds"] / row["seconds"]
    return rows
