"""``qdet bench ...``: the benchmarks of ``qdet.tools.bench`` (and ``bench_*``) as commands that
print tables (or JSON). Every ratio is against a baseline measured in the same run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..common.terminal import console, err, rows_table
from ..models.registry import ARCHS
from .common import Device, fail, pick_device

bench_app = typer.Typer(help="Benchmarks: times and peak memory, as ratios against a "
                             "baseline measured in the same run.", no_args_is_help=True)
Repeat = Annotated[int, typer.Option(help="Timed runs per measurement (median).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@bench_app.command("deform-attn")
def bench_deform_attn_cmd(device: Device = None, repeat: Repeat = 3, as_json: AsJson = False):
    """Multi-scale deformable attention: each backend against the torch reference at
    Deformable DETR's encoder (queries = all pixels) and decoder (300 queries) shapes."""
    from ..tools.bench import bench_deform_attn, machine_description

    device = pick_device(device)
    rows = bench_deform_attn(device, repeat)
    machine = machine_description(device)
    if as_json:
        console.print_json(json.dumps({"machine": machine, "rows": rows}))
        return
    console.print(rows_table(
        f"ms_deform_attn on {machine} (batch 2, 8 heads x 32, 4 levels from 100x150, "
        "4 points, float32)",
        ("shape", "backend", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd x", "fwd+bwd x",
         "memory x"),
        [(f"{r['shape']} ({r['queries']} q)", r["backend"], f"{r['forward_s'] * 1e3:.1f}",
          f"{r['forward_backward_s'] * 1e3:.1f}", f"{r['forward_backward_peak_mib']:.0f}",
          f"{r['forward_speedup']:.2f}", f"{r['forward_backward_speedup']:.2f}",
          f"{r['memory_ratio']:.3f}") for r in rows]))
    console.print("x: speed-up over the torch reference (higher is better); memory x: peak "
                  "memory of forward+backward relative to it (lower is better)")


@bench_app.command("deform-conv")
def bench_deform_conv_cmd(
    device: Device = None,
    repeat: Repeat = 3,
    models: Annotated[bool, typer.Option(help="Also time Dynamic DETR (inference at 800x1066 "
                                         "beside Deformable DETR, and a training step of "
                                         "the built-in preset) with torchvision's "
                                         "deformable convolution and RoIAlign, and with "
                                         "qdet's.")] = True,
    as_json: AsJson = False,
):
    """Modulated deformable convolution (Dynamic DETR's spatial attention): qdet's kernels
    against torchvision's deform_conv2d at the built-in preset's training shape and the
    paper's 800x1066 shape, forward and forward+backward, float32 and bf16."""
    from ..tools.bench import machine_description
    from ..tools.bench_deform_conv import DEFORM_CONV_SHAPES, bench_deform_conv, bench_dynamic_detr

    device = pick_device(device)
    rows = bench_deform_conv(device, repeat)
    dyn = bench_dynamic_detr(device, repeat) if models else None
    machine = machine_description(device)
    if as_json:
        console.print_json(json.dumps({"machine": machine, "rows": rows, "models": dyn}))
        return
    for name, shape in DEFORM_CONV_SHAPES.items():   # a table per shape: fits 80 columns
        console.print(rows_table(
            f"deform_conv2d 3x3 at {name} {'x'.join(map(str, shape))} (N x C x H x W), "
            f"{machine}",
            ("op", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd x", "fwd+bwd x", "memory x"),
            [(r["backend"], f"{r['forward_s'] * 1e3:.1f}",
              f"{r['forward_backward_s'] * 1e3:.1f}", f"{r['forward_backward_peak_mib']:.0f}",
              f"{r['forward_speedup']:.2f}", f"{r['forward_backward_speedup']:.2f}",
              f"{r['memory_ratio']:.2f}") for r in rows if r["shape"] == name]))
    console.print("x: torchvision's time over this row's (higher is faster); memory x: peak "
                  "memory of forward+backward over torchvision's (lower is better)")
    if dyn is None:
        return
    console.print(rows_table(
        f"inference at 800x1066, fast path + bf16, {machine}",
        ("arch", "kernels", "ms", "peak MiB", "speed x"),
        [(r["arch"], r["op"], f"{r['seconds'] * 1e3:.0f}", f"{r['peak_mib']:.0f}",
          f"{r['speedup']:.2f}") for r in dyn["inference"]]))
    console.print(rows_table(
        f"training step, built-in preset, batch 16 at 128 px, {machine}",
        ("arch", "mode", "kernels", "ms", "peak MiB", "speed x"),
        [(r["arch"], r["mode"], r["op"], f"{r['seconds'] * 1e3:.0f}", f"{r['peak_mib']:.0f}",
          f"{r['speedup']:.2f}") for r in dyn["training"]]))


@bench_app.command("models")
def bench_models_cmd(
    arch: Annotated[Optional[list[str]], typer.Option("--arch", "-a", help="Architecture(s) "
                                                      "to measure (repeatable); default: "
                                                      "all.")] = None,
    device: Device = None,
    size: Annotated[str, typer.Option(help="Inference input HxW.")] = "800x1066",
    batch: Annotated[int, typer.Option(help="Inference batch size.")] = 1,
    repeat: Repeat = 3,
    train: Annotated[bool, typer.Option(help="Also time a training step of the built-in "
                                        "preset (batch 16, 128 px).")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the transformer in the "
                                          "fast path.")] = False,
    as_json: AsJson = False,
):
    """Inference latency (paper configuration, random weights) of the eager model, the fast
    path and the fast path in bfloat16, and training step time eager vs bf16+channels_last,
    with peak memory; ratios against eager measured in the same run. --arch also takes
    deformable-refine and deformable-two-stage."""
    from ..models.registry import variant
    from ..tools.bench import bench_inference, bench_training, machine_description

    device = pick_device(device)
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        fail(f"--size must look like 800x1066, got {size!r}")
    names = arch or list(ARCHS)
    try:
        archs = {name: variant(name) for name in names}
    except ValueError as e:
        fail(str(e))
    infer, trains = [], []
    for name, (a, overrides) in archs.items():
        rows = bench_inference(a, device, (h, w), batch, repeat, compile=compile,
                               overrides=overrides)
        if train:
            rows += bench_training(a, device, repeat=repeat, overrides=overrides)
        for row in rows:
            row["arch"] = name
        infer += [r for r in rows if "max_rel_diff" in r]
        trains += [r for r in rows if "max_rel_diff" not in r]
    machine = machine_description(device)
    if as_json:
        console.print_json(json.dumps({"machine": machine, "inference": infer,
                                       "training": trains}))
        return
    console.print(rows_table(
        f"inference at {h}x{w}, batch {batch}, {machine}",
        ("arch", "mode", "ms", "img/s", "speed x", "peak MiB", "max rel diff"),
        [(r["arch"], r["mode"], f"{r['seconds'] * 1e3:.0f}", f"{r['images_per_s']:.2f}",
          f"{r['speedup']:.2f}", f"{r['peak_mib']:.0f}", f"{r['max_rel_diff']:.1e}")
         for r in infer]))
    if trains:
        console.print(rows_table(
            f"training step, built-in preset, batch 16 at 128 px, {machine}",
            ("arch", "mode", "ms", "img/s", "speed x", "peak MiB"),
            [(r["arch"], r["mode"], f"{r['seconds'] * 1e3:.0f}", f"{r['images_per_s']:.1f}",
              f"{r['speedup']:.2f}", f"{r['peak_mib']:.0f}") for r in trains]))


@bench_app.command("switches")
def bench_switches_cmd(
    arch: Annotated[Optional[list[str]], typer.Option("--arch", "-a", help="Architecture(s) "
                                                      "to measure (repeatable); default: "
                                                      "all.")] = None,
    switch: Annotated[Optional[list[str]], typer.Option(
        "--switch", "-s", help="Switch(es) to measure against none (repeatable): '--dn 5', "
        "'--dn 5, contrastive', '--query-groups 3', '--ema', '--accumulate 2', 'loss.mal'; "
        "default: all.")] = None,
    device: Device = None,
    repeat: Repeat = 3,
    as_json: AsJson = False,
):
    """What each training-only switch costs: ms per training step of the built-in preset
    (batch 16 at 128 px, the step qdet train takes), each switch alone against none, per
    method. Inference is unchanged by every switch."""
    from ..tools.bench import machine_description
    from ..tools.bench_switches import bench_switches

    device = pick_device(device)
    names = arch or list(ARCHS)
    for name in names:
        if name not in ARCHS:
            fail(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    rows = []
    try:
        for name in names:
            rows += bench_switches(name, device, repeat=repeat, switches=switch)
    except ValueError as e:
        fail(str(e))
    machine = machine_description(device)
    if as_json:
        console.print_json(json.dumps({"machine": machine, "rows": rows}))
        return
    console.print(rows_table(
        f"training step with each switch, built-in preset, batch 16 at 128 px, {machine}",
        ("arch", "switch", "ms", "x none"),
        [(r["arch"], r["switch"], f"{r['seconds'] * 1e3:.0f}", f"{r['ratio']:.2f}")
         for r in rows]))
    console.print("x none: this step's time over the same method's without any switch")


@bench_app.command("matcher")
def bench_matcher_cmd(
    batch: Annotated[int, typer.Option(help="Images.")] = 32,
    queries: Annotated[int, typer.Option(help="Queries per image.")] = 300,
    targets: Annotated[int, typer.Option(help="Targets per image.")] = 20,
):
    """Hungarian matcher: qdet's batched cost against the official flattened formulation."""
    from ..tools.bench import bench_matcher

    console.print(rows_table(
        f"matcher, batch {batch}, {queries} queries, {targets} targets/image",
        ("class cost", "official ms", "qdet ms", "speed x"),
        [(r["class_cost"], f"{r['official_s'] * 1e3:.1f}", f"{r['qdet_s'] * 1e3:.1f}",
          f"{r['speedup']:.2f}") for r in bench_matcher(batch, queries, targets)]))


@bench_app.command("rcda")
def bench_rcda_cmd(
    device: Device = None,
    repeat: Repeat = 3,
    height: Annotated[int, typer.Option(help="Feature map height (DC5 of 800x1200: 50).")] = 50,
    width: Annotated[int, typer.Option(help="Feature map width (DC5 of 800x1200: 75).")] = 75,
    as_json: AsJson = False,
):
    """Anchor DETR: row-column decoupled attention vs standard attention, time and peak
    memory of forward+backward for one encoder and one decoder layer (d 256, 8 heads, 900
    queries) at a DC5-sized feature map, the paper's reason for RCDA."""
    from ..tools.bench import bench_rcda, machine_description

    device = pick_device(device)
    rows = bench_rcda(device, repeat, (height, width))
    machine = machine_description(device)
    if as_json:
        console.print_json(json.dumps({"machine": machine, "rows": rows}))
        return
    console.print(rows_table(
        f"Anchor DETR attention at {height}x{width}, forward+backward, {machine}",
        ("layer", "attention", "ms", "peak MiB", "speed x", "memory x"),
        [(r["layer"], r["attention"], f"{r['seconds'] * 1e3:.1f}", f"{r['peak_mib']:.0f}",
          f"{r['speedup']:.2f}", f"{r['memory_ratio']:.3f}") for r in rows]))


@bench_app.command("export")
def bench_export_cmd(
    arch: Annotated[Optional[list[str]], typer.Option("--arch", "-a", help="Architecture(s) "
                                                      "to measure (repeatable); default: "
                                                      "all.")] = None,
    size: Annotated[str, typer.Option(help="Input HxW (traced and timed).")] = "800x1066",
    repeat: Repeat = 3,
    as_json: AsJson = False,
):
    """ONNX export of each method's paper configuration (random weights): export time, file
    size, and inference at batch 1 in onnxruntime (CPU) against qdet's fast path in float32,
    in the same process."""
    from ..tools.bench import machine_description
    from ..tools.bench_onnx import bench_export
    from .export import parse_size

    h, w = parse_size(size)
    names = arch or list(ARCHS)
    for name in names:
        if name not in ARCHS:
            fail(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    rows = [bench_export(name, (h, w), repeat) for name in names]
    machine = machine_description("cpu")
    if as_json:
        console.print_json(json.dumps({"machine": machine, "rows": rows}))
        return
    console.print(rows_table(
        f"ONNX export at {h}x{w}, batch 1, float32, {machine}",
        ("arch", "export s", "file MB", "fast path ms", "onnxruntime ms", "ort x",
         "max rel diff", "noise"),
        [(r["arch"], f"{r['export_s']:.1f}", f"{r['file_mb']:.0f}", f"{r['fast_s'] * 1e3:.0f}",
          f"{r['onnxruntime_s'] * 1e3:.0f}", f"{r['speedup']:.2f}", f"{r['max_rel_diff']:.1e}",
          f"{r['noise_rel_diff']:.1e}") for r in rows]))
    console.print("ort x: the fast path's time over onnxruntime's (above 1: onnxruntime is "
                  "faster); max rel diff: onnxruntime against PyTorch, |a - b| / max(|b|, "
                  "0.1); noise: the same for PyTorch against itself on the input times 1 + "
                  "1e-6 noise (random paper weights can be ill-conditioned)")


@bench_app.command("deform-attn-onnx")
def bench_deform_attn_onnx_cmd(repeat: Repeat = 5, as_json: AsJson = False):
    """Deformable attention in onnxruntime at Deformable DETR's 800x1066 shapes: the
    grid_sample formulations (levels stacked, levels summed: the one qdet exports) against a
    gather formulation, with qdet's Numba kernel in PyTorch for scale."""
    from ..tools.bench import machine_description
    from ..tools.bench_onnx import bench_deform_attn_onnx

    rows = bench_deform_attn_onnx(repeat)
    machine = machine_description("cpu")
    if as_json:
        console.print_json(json.dumps({"machine": machine, "rows": rows}))
        return
    console.print(rows_table(
        f"deformable attention in onnxruntime, {machine} (batch 1, 8 heads x 32, 4 levels "
        "from 100x134, 4 points, float32)",
        ("shape", "formulation", "ms", "x", "max abs diff"),
        [(f"{r['shape']} ({r['queries']} q)", r["formulation"], f"{r['seconds'] * 1e3:.1f}",
          f"{r['speedup']:.2f}", f"{r['max_abs_diff']:.1e}") for r in rows]))
    console.print("*: the formulation qdet exports; x: its time over this row's (above 1: "
                  "this row is faster)")


@bench_app.command("gpu")
def bench_gpu_cmd(
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the markdown "
                                                "report to this file.", dir_okay=False)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="About 2 minutes instead of 5: the "
                                        "paper's shapes, fewer repeats, no compiling.")] = False,
    simulate: Annotated[bool, typer.Option("--simulate", help="No GPU: check the kernels "
                                           "against their references at tiny shapes under "
                                           "Numba's CUDA simulator.")] = False,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Time "
                                                    "each method with its transformer "
                                                    "compiled (default: yes, but not with "
                                                    "--quick).")] = None,
    device: Annotated[str, typer.Option(help="The GPU: cuda or cuda:N.")] = "cuda",
):
    """One GPU, 5 minutes, one report: every CUDA kernel against its reference (forward and
    backward, fp32 and bf16), the kernels' times and memory against the references, each
    method's inference and training throughput, and the machine (GPU, driver, versions).
    Exits non-zero without a GPU or when a check fails."""
    from ..tools.bench_gpu import NoCuda, make_plan, run_gpu_bench
    from ..tools.gpu_report import checks_passed, render, write_report

    plan = make_plan(quick=quick, simulate=simulate, compile=compile)
    try:
        result = run_gpu_bench(plan, device, log=lambda line: err.print(line, markup=False,
                                                                        highlight=False))
    except NoCuda as e:
        fail(str(e))
    console.print(render(result), markup=False, highlight=False, soft_wrap=True)
    if out is not None:
        write_report(result, out)
        err.print(f"report written to {out}", markup=False, highlight=False)
    passed, total = checks_passed(result)
    if passed < total:
        fail(f"{total - passed} of {total} kernel checks did not pass (see the report)")


@bench_app.command("data")
def bench_data_cmd(
    images: Annotated[int, typer.Option(help="Training images of the built-in data to write "
                                        "and read (128 px PNGs).")] = 4000,
    repeat: Repeat = 3,
    as_json: AsJson = False,
):
    """Reading speed of each dataset format (COCO, YOLO, Pascal VOC) on the same images:
    everything `qdet train` reads and checks before its first step, as a ratio against
    COCO; and conversion speed (`qdet data convert`), linking and copying images."""
    from ..tools.bench import machine_description
    from ..tools.bench_data import bench_data

    result = bench_data(images, repeat)
    machine = machine_description("cpu")
    if as_json:
        console.print_json(json.dumps({"machine": machine, **result}))
        return
    console.print(rows_table(
        f"reading {images} images (labels checked, headers read), {machine}",
        ("format", "s", "images/s", "x COCO"),
        [(r["format"], f"{r['seconds']:.2f}", f"{r['images_per_s']:.0f}", f"{r['vs_coco']:.2f}")
         for r in result["reading"]]))
    console.print(rows_table(
        f"qdet data convert, {images} images, {machine}", ("conversion", "s", "images/s"),
        [(r["conversion"], f"{r['seconds']:.2f}", f"{r['images_per_s']:.0f}")
         for r in result["conversion"]]))
    console.print("x COCO: COCO's reading time over this format's (above 1: faster)")


@bench_app.command("video")
def bench_video_cmd(
    arch: Annotated[str, typer.Option("--arch", "-a", help="Architecture of the built-in "
                                      "preset model measured beside DETR-R50.")] = "conditional",
    frames: Annotated[int, typer.Option(help="Frames of the test clip.")] = 120,
    size: Annotated[str, typer.Option(help="Frame WxH of the test clip.")] = "640x480",
    batch: Annotated[int, typer.Option(help="Frames per model call.")] = 4,
    repeat: Annotated[int, typer.Option(help="Runs of each measurement (the best is "
                                        "kept).")] = 1,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="Also measure bfloat16 "
                                       "autocast (slow on CPUs without AVX-512 BF16).")] = True,
    as_json: AsJson = False,
):
    """`qdet predict` on a video: frames per second of the whole pipeline against the model
    alone on the same frames (1: the model is the bottleneck), decoding alone and decoding
    plus encoding, for the built-in preset model and DETR-R50 at 640 px, fp32 and bf16."""
    from ..tools.bench import machine_description
    from ..tools.bench_video import bench_video

    if arch not in ARCHS:
        fail(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        fail(f"--size must look like 640x480, got {size!r}")
    from ..data.errors import DataError

    try:
        result = bench_video(arch, frames, (w, h), batch, ("fp32", "bf16") if bf16 else ("fp32",),
                             repeat=repeat)
    except DataError as e:   # no PyAV
        fail(str(e))
    machine = machine_description("cpu")
    if as_json:
        console.print_json(json.dumps({"machine": machine, **result}))
        return
    console.print(f"{frames} frames of {w}x{h}, {machine}: decoding alone "
                  f"{result['decode_fps']:.0f} fps, decoding + encoding "
                  f"{result['decode_encode_fps']:.0f} fps")
    console.print(rows_table(
        f"qdet predict on a video, batch {batch}, {machine}",
        ("model", "precision", "model fps", "pipeline fps", "pipeline / model"),
        [(r["model"], r["precision"], f"{r['model_fps']:.2f}", f"{r['pipeline_fps']:.2f}",
          f"{r['ratio']:.2f}") for r in result["rows"]]))
    console.print("model fps: the model alone on the frames held in memory; pipeline: decode, "
                  "model, draw, encode in three threads (1.00: the model is the bottleneck)")
