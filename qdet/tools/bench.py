"""Benchmarks (``qdet bench ...``): timings and peak memory as ratios against a baseline
measured in the same run. Not tests: numbers depend on the machine."""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable

import torch

# Deformable DETR's encoder at an 800x1200 input: strides 8..64, batch 2, 8 heads x 32.
ENCODER_LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _release_freed_memory() -> None:
    """Hand memory that malloc keeps after free back to the OS, so that a later peak shows
    in the resident size instead of hiding in reused pages (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Extra memory at the peak of ``fn()``: CUDA allocator peak on a GPU; on the CPU the
    process's resident high-water mark (reset through /proc/self/clear_refs, Linux) above
    the resident size before the call."""
    gc.collect()
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _proc_kib("VmRSS")
    fn()
    return (_proc_kib("VmHWM") - base) / 1024


def ratio(a: float, b: float) -> float:
    """``a / b``, or NaN where the baseline measured nothing: a tiny case's peak memory can
    stay below the resident set's page granularity, and a ratio to 0 says nothing."""
    return a / b if b > 0 else float("nan")


def time_it(fn: Callable[[], object], device: torch.device, repeat: int = 3,
            warmup: int = 1) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls. On a GPU each call is timed by
    CUDA events on the current stream, synchronized before and after it: the GPU's time from
    the call's start to its last kernel, gaps where the host was still launching included."""
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, device, repeat, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_cuda(fn: Callable[[], object], device: torch.device, repeat: int,
               warmup: int) -> float:
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)    # milliseconds
    return statistics.median(times)


def deform_attn_inputs(num_queries: int | None, device, dtype=torch.float32, batch: int = 2,
                       heads: int = 8, channels: int = 32, points: int = 4,
                       levels=ENCODER_LEVELS, spread: float = 2.0, seed: int = 0):
    """Inputs shaped as in Deformable DETR. Each query has a reference point (encoder: the
    centre of its own pixel; decoder: uniform in the image) and samples every level around
    it, ``spread`` pixels (std) away: the local pattern the model's offsets produce."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in levels)
    if num_queries is None:
        refs = []
        for h, w in levels:
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            refs.append(torch.stack([xs.flatten() / w, ys.flatten() / h], -1))
        ref = torch.cat(refs)                                            # [S, 2]
    else:
        ref = torch.rand(num_queries, 2, generator=g)
    lq = ref.shape[0]
    value = torch.randn(batch, s, heads, channels, generator=g, dtype=dtype)
    norm = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)
    offsets = torch.randn(batch, lq, heads, len(levels), points, 2, generator=g) * spread
    loc = (ref[None, :, None, None, None, :] + offsets / norm[None, None, None, :, None, :])
    attn = torch.rand(batch, lq, heads, len(levels) * points, generator=g)
    attn = attn.softmax(-1).view(batch, lq, heads, len(levels), points)
    return [t.to(device=device, dtype=dtype) for t in (value, loc, attn)], levels


# the shapes ``qdet bench deform-attn`` measures: keyword arguments of deform_attn_inputs
DEFORM_ATTN_CASES = {"encoder": dict(num_queries=None), "decoder": dict(num_queries=300)}


def bench_deform_attn(device: str = "cpu", repeat: int = 3, backends=None,
                      cases: dict[str, dict] | None = None) -> list[dict]:
    """Forward and forward+backward time and peak memory of each backend at Deformable
    DETR's encoder shape (queries = all pixels) and decoder shape (300 queries), or at
    ``cases``: name -> keyword arguments of :func:`deform_attn_inputs`."""
    from ..ops.deform_attn import ms_deform_attn

    dev = torch.device(device)
    if backends is None:
        backends = ["torch", "numba"] if dev.type == "cpu" else ["torch", "cuda"]
    rows = []
    for name, case in (DEFORM_ATTN_CASES if cases is None else cases).items():
        (value, loc, attn), levels = deform_attn_inputs(device=dev, **case)
        for backend in backends:
            def fwd():
                with torch.no_grad():
                    return ms_deform_attn(value, levels, None, loc, attn, backend=backend)

            def fwd_bwd():
                v, lo, a = (t.detach().requires_grad_() for t in (value, loc, attn))
                out = ms_deform_attn(v, levels, None, lo, a, backend=backend)
                out.backward(torch.ones_like(out))
                return v.grad, lo.grad, a.grad

            row = {"shape": name, "queries": loc.shape[1], "backend": backend,
                   "forward_s": time_it(fwd, dev, repeat),
                   "forward_backward_s": time_it(fwd_bwd, dev, repeat),
                   "forward_backward_peak_mib": peak_memory_mib(fwd_bwd, dev)}
            rows.append(row)
    for row in rows:  # ratios against the torch reference of the same shape
        ref = next(r for r in rows if r["shape"] == row["shape"] and r["backend"] == "torch")
        row["forward_speedup"] = ref["forward_s"] / row["forward_s"]
        row["forward_backward_speedup"] = ref["forward_backward_s"] / row["forward_backward_s"]
        row["memory_ratio"] = ratio(row["forward_backward_peak_mib"],
                                    ref["forward_backward_peak_mib"])
    return rows


def machine_description(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def _materializing(forward):
    def wrapped(*args, **kwargs):
        kwargs.update(need_weights=True, average_attn_weights=False)
        return forward(*args, **kwargs)
    return wrapped


def bench_rcda(device: str = "cpu", repeat: int = 3, size: tuple[int, int] = (50, 75),
               batch: int = 1, queries: int = 900, backward: bool = True) -> list[dict]:
    """Anchor DETR's row-column decoupled attention against standard attention (PyTorch's
    fused kernel, and one that materializes the attention weights), for the encoder's
    self-attention (every cell a query) and the decoder's cross-attention (``queries``
    queries), at a DC5-sized map (800x1200 input at stride 16: 50x75)."""
    from ..blocks.position_encoding import sine_embed_points
    from ..models.anchor_detr import Config, DecoderLayer, EncoderLayer, axis_positions, sine_1d

    dev = torch.device(device)
    h, w = size
    g = torch.Generator().manual_seed(0)
    rows = []
    for attention in ("standard", "standard, weights materialized", "rcda"):
        cfg = Config(attention="rcda" if attention == "rcda" else "standard")
        d = cfg.d_model
        enc, dec = EncoderLayer(cfg).to(dev), DecoderLayer(cfg).to(dev)
        if attention.endswith("materialized"):
            # as attention was computed in 2021 (and with need_weights=True today): the
            # [heads, Nq, H*W] weights exist in memory, which RCDA was designed to avoid
            for mha in (enc.self_attn, dec.cross_attn):
                mha.forward = _materializing(mha.forward)
        src = torch.randn(batch, h, w, d, generator=g).to(dev)
        mask = torch.zeros(batch, h, w, dtype=torch.bool, device=dev)
        y, x = axis_positions(mask)
        pos_row, pos_col = sine_1d(x, d)[:, None], sine_1d(y, d)[:, :, None]
        xy = torch.stack([x[:, None, :].expand(batch, h, w), y[:, :, None].expand(batch, h, w)], -1)
        pos_2d = sine_embed_points(xy, d // 2)
        tgt = torch.randn(batch, queries, d, generator=g).to(dev)
        ref = torch.rand(batch, queries, 2, generator=g).to(dev)
        qpos = sine_embed_points(ref, d // 2)
        qx, qy = sine_1d(ref[..., 0], d), sine_1d(ref[..., 1], d)
        for name, fn in (("encoder self-attention", lambda: enc(src.requires_grad_(backward), mask,
                                                                pos_row, pos_col, pos_2d)),
                         ("decoder cross-attention", lambda: dec(tgt.requires_grad_(backward), qpos,
                                                                 qx, qy, src, mask, pos_row,
                                                                 pos_col, pos_2d))):
            def step():
                out = fn()
                if backward:
                    out.sum().backward()
                return out

            rows.append({"layer": name, "attention": attention,
                         "seconds": time_it(step, dev, repeat),
                         "peak_mib": peak_memory_mib(step, dev)})
    for row in rows:
        ref_row = next(r for r in rows
                       if r["layer"] == row["layer"] and r["attention"] == "standard")
        row["speedup"] = ref_row["seconds"] / row["seconds"]
        row["memory_ratio"] = ratio(row["peak_mib"], ref_row["peak_mib"])
    return rows


def random_images(batch: int, size: tuple[int, int], device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, *size, generator=g).to(device) for _ in range(batch)]


def bench_inference(arch: str, device: str = "cpu", size: tuple[int, int] = (800, 1066),
                    batch: int = 1, repeat: int = 3, modes=("eager", "fast", "fast+bf16"),
                    compile: bool = False,
                    prepare: Callable[[torch.nn.Module], None] | None = None,
                    overrides: dict | None = None) -> list[dict]:
    """Inference latency of ``arch`` with the paper's configuration (random weights) at
    ``size``: the plain eager model, the fast path (``qdet.blocks.fast``), and the fast path under
    bfloat16 autocast; with peak memory and the largest output difference to the first
    mode, relative to its output's magnitude. ``prepare(model)`` runs once after building;
    ``overrides`` change the configuration."""
    import copy

    from ..blocks.fast import optimize_for_inference
    from ..models.registry import build_model

    dev = torch.device(device)
    torch.manual_seed(0)
    eager = build_model(arch, overrides).to(dev).eval()
    if prepare is not None:
        prepare(eager)
    images = random_images(batch, size, dev)
    rows, ref = [], None
    for mode in modes:
        model = eager
        if mode != "eager":
            model = optimize_for_inference(copy.deepcopy(eager), compile=compile)
        bf16 = mode.endswith("bf16")

        def run():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                        enabled=bf16):
                return model(images)

        out = run()
        diff = 0.0
        if ref is None:
            ref = out
        else:  # relative to the eager output's magnitude
            diff = max(((out[k].float() - ref[k].float()).abs().max()
                        / ref[k].float().abs().max().clamp(min=1e-12)).item()
                       for k in ("pred_logits", "pred_boxes"))
        seconds = time_it(run, dev, repeat)
        rows.append({"arch": arch, "mode": mode, "seconds": seconds,
                     "images_per_s": batch / seconds, "peak_mib": peak_memory_mib(run, dev),
                     "max_rel_diff": diff})
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    return rows


def random_targets(batch: int, num_classes: int, device, seed: int = 0) -> list[dict]:
    """1-4 boxes per image (normalized cx, cy, w, h) with random labels: what a training
    step's loss needs when images are random too."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        k = int(torch.randint(1, 5, (), generator=g))
        centre = torch.rand(k, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(k, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (k,), generator=g).to(device),
                        "boxes": torch.cat([centre, size], 1).to(device)})
    return targets


def bench_training(arch: str, device: str = "cpu", batch: int = 16,
                   size: int | tuple[int, int] = 128, repeat: int = 3,
                   modes=("eager", "bf16+channels_last"),
                   prepare: Callable[[torch.nn.Module], None] | None = None,
                   recipe: str = "shapes", overrides: dict | None = None) -> list[dict]:
    """Training step time (forward, loss, backward, AdamW) of ``arch``'s built-in-data preset
    on ``batch`` images of ``size`` px (``recipe="shapes"``), or of its paper configuration
    on random ``size`` = (H, W) images with random boxes (``recipe="paper"``), eager against
    bf16 autocast + channels_last. ``prepare(model)`` runs on each model after building;
    ``overrides`` change the recipe's configuration."""
    from ..data.datasets import ShapesDataset, collate
    from ..data.shapes import ShapesConfig
    from ..engine.criterion import SetCriterion
    from ..engine.presets import preset
    from ..models.registry import build_model

    dev = torch.device(device)
    if recipe == "paper":
        config = {**preset(arch, "paper").model, **(overrides or {})}
        images = random_images(batch, (size, size) if isinstance(size, int) else size, dev)
        targets = None        # made for the model's number of classes, once it is built
    else:
        config = {**preset(arch, "shapes").model, "num_classes": 5, **(overrides or {})}
        data = ShapesDataset("train", ShapesConfig(image_size=size))
        images, targets = collate([data[i] for i in range(batch)])
        images = [im.to(dev) for im in images]
        targets = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
    rows = []
    for mode in modes:
        torch.manual_seed(0)
        model = build_model(arch, config).to(dev).train()
        if prepare is not None:
            prepare(model)
        fast = mode != "eager"
        if fast:
            model.to(memory_format=torch.channels_last)
        classes = model.config.num_classes
        if targets is None:
            targets = random_targets(batch, classes, dev)
        crit = SetCriterion(classes, model.config.loss, model.focal).to(dev)
        opt = torch.optim.AdamW(model.parameters(), 1e-4, foreach=True)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=fast):
                out = model(images, targets)      # with DINO's denoising queries
            loss = crit.weighted(crit(out, targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        seconds = time_it(step, dev, repeat)
        rows.append({"arch": arch, "mode": mode, "seconds": seconds,
                     "images_per_s": batch / seconds, "peak_mib": peak_memory_mib(step, dev)})
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    return rows


def bench_matcher(batch: int = 32, queries: int = 300, targets: int = 20, classes: int = 91,
                  repeat: int = 5) -> list[dict]:
    """qdet's matcher (batched [B,Q,T_max] costs, one solve per image) against the official
    DETR matcher's formulation (one [B*Q, sum T] cost matrix split per image)."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_convert, generalized_box_iou

    from ..blocks.base import LossConfig
    from ..engine.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(batch, queries, classes, generator=g),
               "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25}
    tgts = [{"labels": torch.randint(0, classes, (targets,), generator=g),
             "boxes": torch.rand(targets, 4, generator=g) * 0.5 + 0.25} for _ in range(batch)]
    rows = []
    for focal in (False, True):
        cfg = LossConfig(class_cost=2.0 if focal else 1.0)
        ours = HungarianMatcher(cfg, focal)

        def flattened():  # the formulation of the official repositories
            logits = outputs["pred_logits"].flatten(0, 1)
            boxes = outputs["pred_boxes"].flatten(0, 1)
            ids = torch.cat([t["labels"] for t in tgts])
            tb = torch.cat([t["boxes"] for t in tgts])
            if focal:
                p = logits.sigmoid()
                neg = 0.75 * p ** 2 * -(1 - p + 1e-8).log()
                pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
                c_cls = pos[:, ids] - neg[:, ids]
            else:
                c_cls = -logits.softmax(-1)[:, ids]
            c = (cfg.bbox_cost * torch.cdist(boxes, tb, p=1) + cfg.class_cost * c_cls
                 - cfg.giou_cost * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                       box_convert(tb, "cxcywh", "xyxy")))
            c = c.view(batch, queries, -1)
            sizes = [len(t["boxes"]) for t in tgts]
            return [linear_sum_assignment(m[i]) for i, m in enumerate(c.split(sizes, -1))]

        with torch.no_grad():
            base = time_it(flattened, torch.device("cpu"), repeat)
            mine = time_it(lambda: ours(outputs, tgts), torch.device("cpu"), repeat)
        rows.append({"class_cost": "focal" if focal else "softmax", "official_s": base,
                     "qdet_s": mine, "speedup": base / mine})
    return rows
