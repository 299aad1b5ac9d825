"""`qdet bench gpu` without a GPU: `--simulate` runs every CUDA kernel against its reference
under Numba's CUDA simulator; without CUDA the command says so in one line; the plan, the
checks, the budget and the report work on the CPU (numba backend), with no GPU figure
made up."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qdet
from qdet.models.registry import ARCHS
from qdet.tools.bench_gpu import GpuPlan, make_plan, measure
from qdet.tools.gpu_checks import TOLERANCES, Check, op_runner, plan_checks, run_checks
from qdet.tools.gpu_report import checks_passed, render, write_report

from conftest import TINY

ROOT = Path(qdet.__file__).parent.parent


def qdet_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qdet", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=env)


def test_simulate_checks_every_kernel_forward_and_backward(tmp_path):
    out = tmp_path / "gpu-report.md"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = qdet_cli("bench", "gpu", "--simulate", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert report.strip() == proc.stdout.strip()      # printed and written alike
    assert "Numba's CUDA simulator" in report and "12 of 12 checks pass" in report
    for op in ("deform_attn", "deform_conv"):
        for dtype in ("fp32", "bf16"):
            for direction in ("forward", "backward"):
                assert f"| {dtype} | {direction} | pass |" in report.split(f"| {op} |", 1)[1]
    assert "## 2." not in report            # nothing timed in the simulator


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_cuda_one_line_and_non_zero():
    proc = qdet_cli("bench", "gpu")
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA GPU"), proc.stderr
    assert "--simulate" in lines[0]


def test_plans_cover_every_kernel_shape_dtype_and_method():
    full, quick, sim = make_plan(), make_plan(quick=True), make_plan(simulate=True)
    checks = plan_checks()
    assert {(c.op, c.shape.split()[0], c.dtype) for c in checks} == {
        (op, shape, dtype) for op in ("deform_attn", "deform_conv")
        for shape in ("preset", "paper") for dtype in ("fp32", "bf16")}
    assert all(c.shape.startswith("tiny") for c in plan_checks(simulate=True))
    assert full.archs == quick.archs == tuple(ARCHS) and sim.archs == ()
    assert full.compile and not quick.compile and make_plan(quick=True, compile=True).compile
    assert full.budget_s <= 300 - 20 and quick.budget_s <= 120 - 10   # room to start and end
    assert set(full.infer_modes) == {"eager", "fast", "fast+bf16"}
    assert full.size == (800, 1066)
    assert set(full.attn_cases) == {"preset encoder", "preset decoder", "paper encoder",
                                    "paper decoder"} and set(full.conv_shapes) == {"preset",
                                                                                  "paper"}


def test_checks_catch_a_wrong_kernel_and_one_that_fails():
    tiny = [c for c in plan_checks(simulate=True) if c.op == "deform_attn"][:1]
    cpu = torch.device("cpu")
    good = run_checks(tiny, cpu, op_runner("numba"))
    assert [r.direction for r in good] == ["forward", "backward"]
    assert all(r.passed and r.max_rel < TOLERANCES["fp32"][0] for r in good)

    def wrong(op, tensors, extra, grad):       # a kernel whose location gradient is off
        out = op_runner("numba")(op, tensors, extra, grad)
        return {**out, "loc": out["loc"] * 1.01}

    forward, backward = run_checks(tiny, cpu, wrong)
    assert forward.passed and not backward.passed and backward.worst == "loc"
    assert 0.005 < backward.max_rel < 0.02

    def broken(op, tensors, extra, grad):
        raise RuntimeError("Numba cannot compile this")

    rows = run_checks(tiny, cpu, broken)
    assert not any(r.passed for r in rows) and "cannot compile" in rows[0].error

    def nan(op, tensors, extra, grad):
        out = op_runner("numba")(op, tensors, extra, grad)
        out["out"].view(-1)[0] = float("nan")
        return out

    assert not run_checks(tiny, cpu, nan)[0].passed


def tiny_plan(**changes) -> GpuPlan:
    plan = dict(archs=("dynamic",), size=(64, 64), overrides={"dynamic": TINY["dynamic"]},
                repeat=1, infer_modes=("fast",), train_modes=("eager",), compile=False,
                attn_cases={"tiny": dict(num_queries=5, batch=1, heads=2, channels=4, points=2,
                                         levels=[(4, 4), (2, 2)])},
                conv_shapes={"tiny": (1, 4, 5, 6)},
                checks=[Check("deform_conv", "tiny", "fp32", {"shape": (1, 2, 3, 4)})])
    return GpuPlan(**{**plan, **changes})


def test_a_baseline_that_measured_no_memory_gives_no_ratio(monkeypatch, one_thread):
    """A tiny case's peak can stay under the resident set's granularity (0 MiB): the memory
    ratio is then unknown (NaN, '–' in the report), not a crash that drops the timings (it
    did, under load, in a full test run)."""
    import qdet.tools.bench as bench

    monkeypatch.setattr(bench, "peak_memory_mib", lambda fn, dev: 0.0)
    plan = tiny_plan()
    rows = bench.bench_deform_attn("cpu", 1, None, plan.attn_cases)
    assert [r["backend"] for r in rows] == ["torch", "numba"]
    assert all(r["memory_ratio"] != r["memory_ratio"] for r in rows)      # NaN
    assert all(r["forward_speedup"] > 0 for r in rows)


def test_every_part_runs_and_reports_on_the_cpu(tmp_path, one_thread):
    """The whole pipeline with the numba backend, tiny sizes: the report has each part and
    names the CPU, never a GPU."""
    result = measure(tiny_plan(), torch.device("cpu"))
    assert checks_passed(result) == (2, 2)
    assert [r["backend"] for r in result["deform_attn"]] == ["torch", "numba"], result["notes"]
    assert [r["backend"] for r in result["deform_conv"]] == ["torchvision", "torch", "numba",
                                                             "numba bf16"]
    assert [(r["arch"], r["mode"]) for r in result["inference"]] == [("dynamic", "fast")]
    assert [(r["arch"], r["mode"]) for r in result["training"]] == [("dynamic", "eager")]
    path = write_report(result, tmp_path / "r.md")
    report = path.read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "### Inference", "### Training step"):
        assert heading in report
    assert "| GPU | none: numba backend on the CPU" in report and "| torch |" in report
    assert "batch 1 at 64×64" in report and "not measured (--quick, or --no-compile)" in report


def test_what_the_budget_cannot_fit_is_left_out_and_said():
    result = measure(tiny_plan(budget_s=0, compile=True, attn_cases={}, conv_shapes={}),
                     torch.device("cpu"))
    assert result["inference"] == result["training"] == result["compiled"] == []
    notes = " ".join(result["notes"])
    assert "left out for the time budget: inference and training of dynamic" in notes
    assert "the compiled transformer of dynamic" in notes
    assert "## Notes" in render(result)


def test_report_shows_a_failed_check_and_exit_is_non_zero():
    row = dict(op="deform_attn", shape="paper encoder", dtype="fp32", worst="loc",
               max_abs=1.0, max_rel=0.2, tolerance=1e-4, error=None, seconds=1.0)
    result = {"plan": {"quick": False, "simulate": False, "size": [800, 1066]},
              "machine": {"GPU": "NVIDIA test card"}, "seconds": 1.0, "notes": [],
              "checks": [dict(row, direction="forward", passed=True, max_rel=1e-6),
                         dict(row, direction="backward", passed=False)],
              "deform_attn": [], "deform_conv": [], "inference": [], "training": [],
              "compiled": []}
    report = render(result)
    assert "| backward | **FAIL** | loc | 1.0e+00 | 2.0e-01 | 0.0001 |" in report
    assert "**1 of 2 checks pass.**" in report
    assert checks_passed(result) == (1, 2)
