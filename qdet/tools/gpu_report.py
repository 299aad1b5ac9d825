"""The markdown report of ``qdet bench gpu`` (``qdet.tools.bench_gpu``): the machine, the
kernel checks, the kernel times and the models' throughput, written atomically."""
from __future__ import annotations

import math
from pathlib import Path

from ..common.files import write_atomic
from .gpu_checks import OPS, REFERENCES, TOLERANCES


def _num(v: float, fmt: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |"
                    for r in rows]


def checks_passed(result: dict) -> tuple[int, int]:
    """(passed, total) checks of a result; a check is one direction of one comparison."""
    checks = result["checks"]
    return sum(bool(c["passed"]) for c in checks), len(checks)


def _mode(plan: dict) -> str:
    return "--simulate" if plan["simulate"] else ("--quick" if plan["quick"] else "full")


def _check_rows(result: dict) -> list[str]:
    passed, total = checks_passed(result)
    lines = ["## 1. The CUDA kernels against their references", "",
             "Kernel and reference get the same inputs (float32, or rounded to bfloat16 for "
             "bf16); the reference computes in float64 on them, so a difference is the "
             "kernel's own error. Forward compares the output, backward every input's "
             "gradient for the same random output gradient; each row gives the tensor with "
             "the largest relative error: the largest absolute difference over the largest "
             "magnitude of the reference tensor.", ""]
    lines += [f"- {OPS[op]}: reference {ref}" for op, ref in REFERENCES.items()]
    lines += [f"- tolerance {dtype}: {tol:g} relative ({why})"
              for dtype, (tol, why) in TOLERANCES.items()]
    lines.append("")
    rows = []
    for c in result["checks"]:
        status = "error" if c["error"] else ("pass" if c["passed"] else "**FAIL**")
        rows.append([c["op"], c["shape"], c["dtype"],
                     c["direction"], status, c["worst"] or "–", _num(c["max_abs"], ".1e"),
                     _num(c["max_rel"], ".1e"), f"{c['tolerance']:g}"])
    lines += _table(["op", "shape", "dtype", "direction", "result", "worst tensor",
                     "max abs", "max rel", "tolerance"], rows)
    errors = [c for c in result["checks"] if c["error"] and c["direction"] == "forward"]
    lines += ["", f"**{passed} of {total} checks pass.**"]
    lines += [f"- {c['op']} {c['shape']} {c['dtype']} could not run: {c['error']}"
              for c in errors]
    return lines + [""]


def _timing_rows(result: dict) -> list[str]:
    if not (result["deform_attn"] or result["deform_conv"]):
        return []
    lines = ["## 2. Kernel times against the references", "",
             "Median of CUDA-event times after a warm-up; peak memory is the allocator's "
             "peak during forward+backward above what was allocated before; × is the "
             "reference's time (or memory) over the row's, measured in the same run "
             "(above 1: faster; for memory, below 1: less).", ""]
    attn, conv = result["deform_attn"], result["deform_conv"]
    if attn:
        lines += ["### Multi-scale deformable attention, float32", "",
                  "preset: the built-in data's Deformable DETR (batch 16 at 128 px: levels "
                  "16×16, 8×8, 4×4; 8 heads × 16 channels; 4 points; 20 decoder queries); "
                  "paper: Deformable DETR at 800×1066 (batch 1: levels 100×134, 50×67, "
                  "25×34, 13×17; 8 heads × 32; 4 points; 300 decoder queries). Encoder: a "
                  "query per pixel.", ""]
        lines += _table(
            ["shape", "backend", "forward ms", "fwd+bwd ms", "peak MiB", "forward ×",
             "fwd+bwd ×", "memory ×"],
            [[f"{r['shape']} ({r['queries']} q)", r["backend"], _num(r["forward_s"] * 1e3),
              _num(r["forward_backward_s"] * 1e3), _num(r["forward_backward_peak_mib"], ".0f"),
              _num(r["forward_speedup"]), _num(r["forward_backward_speedup"]),
              _num(r["memory_ratio"])] for r in attn])
        lines.append("")
    if conv:
        lines += ["### Modulated deformable convolution, 3×3, as many output channels as "
                  "input", "",
                  "preset: Dynamic DETR's built-in preset (16×128×16×16, N×C×H×W); paper: "
                  "at 800×1066 (1×256×100×134). torchvision: its CUDA op; torch: the gather "
                  "reference; cuda: qdet's kernels (bf16: under bfloat16 autocast).", ""]
        lines += _table(
            ["shape", "op", "forward ms", "fwd+bwd ms", "peak MiB", "forward ×",
             "fwd+bwd ×", "memory ×"],
            [[r["shape"], r["backend"], _num(r["forward_s"] * 1e3),
              _num(r["forward_backward_s"] * 1e3), _num(r["forward_backward_peak_mib"], ".0f"),
              _num(r["forward_speedup"]), _num(r["forward_backward_speedup"]),
              _num(r["memory_ratio"])] for r in conv])
        lines.append("")
    return lines


def _model_rows(result: dict) -> list[str]:
    infer, train, comp = result["inference"], result["training"], result["compiled"]
    if not (infer or train or comp):
        return []
    size = "×".join(str(v) for v in result["plan"].get("size", (800, 1066)))
    lines = ["## 3. Models", "",
             f"Each method's paper configuration with random weights. Inference: batch 1 at "
             f"{size}; eager: the model as built; fast: BN folded, channels_last "
             "(`qdet.load(..., fast=True)`); bf16: under bfloat16 autocast. Training: one "
             f"step (forward, loss, backward, AdamW) on the paper recipe's images per GPU at "
             f"{size} with random boxes; bf16+channels_last as `qdet train` runs on a "
             "GPU. × is against the method's first row.", ""]
    if infer:
        lines += ["### Inference", ""]
        lines += _table(["method", "mode", "ms", "images/s", "×", "peak MiB",
                         "max rel diff"],
                        [[r["arch"], r["mode"], _num(r["seconds"] * 1e3, ".1f"),
                          _num(r["images_per_s"], ".1f"), _num(r["speedup"]),
                          _num(r["peak_mib"], ".0f"), _num(r["max_rel_diff"], ".1e")]
                         for r in infer])
        lines.append("")
    if train:
        lines += ["### Training step", ""]
        lines += _table(["method", "mode", "images", "ms", "images/s", "×", "peak MiB"],
                        [[r["arch"], r["mode"], str(round(r["images_per_s"] * r["seconds"])),
                          _num(r["seconds"] * 1e3, ".1f"), _num(r["images_per_s"], ".1f"),
                          _num(r["speedup"]), _num(r["peak_mib"], ".0f")] for r in train])
        lines.append("")
    if comp:
        plain = {r["arch"]: r for r in infer if r["mode"] == "fast+bf16"}
        lines += ["### Compiled transformer (fast path, bf16, `--compile`)", "",
                  "× is against the same mode uncompiled; wall s: building, compiling and "
                  "timing the row.", ""]
        lines += _table(["method", "ms", "images/s", "×", "peak MiB", "wall s"],
                        [[r["arch"], _num(r["seconds"] * 1e3, ".1f"),
                          _num(r["images_per_s"], ".1f"),
                          _num(plain[r["arch"]]["seconds"] / r["seconds"])
                          if r["arch"] in plain else "–",
                          _num(r["peak_mib"], ".0f"), _num(r.get("wall_s"), ".0f")]
                         for r in comp])
        lines.append("")
    return lines


def render(result: dict) -> str:
    """The report of a :func:`qdet.tools.bench_gpu.run_gpu_bench` result, as markdown."""
    plan = result["plan"]
    lines = ["# qdet bench gpu", "",
             f"`qdet bench gpu` ({_mode(plan)}), {result['seconds']:.0f} s. "
             + ("Simulated: the CUDA kernels ran under Numba's CUDA simulator on the CPU, at "
                "tiny shapes; the errors are measured, nothing was timed."
                if plan["simulate"] else
                "Measured on the machine below; nothing here is estimated."), ""]
    lines += _table(["", ""], [[k, v] for k, v in result["machine"].items()])
    lines.append("")
    lines += _check_rows(result)
    lines += _timing_rows(result)
    lines += _model_rows(result)
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(result: dict, path: str | Path) -> Path:
    """Write :func:`render`'s markdown to ``path`` atomically."""
    return write_atomic(path, render(result))
