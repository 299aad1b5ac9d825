"""``qdet bench gpu``: on one GPU, in a few minutes, everything a first GPU run should show,
in one markdown report (``qdet.tools.gpu_report``):

1. every Numba CUDA kernel against its reference, forward and backward, float32 and
   bfloat16, at the built-in preset's and the paper's shapes (``qdet.tools.gpu_checks``);
2. the kernels' times against those references (CUDA events, warm-up, median) and peak GPU
   memory (``bench_deform_attn``, ``bench_deform_conv``);
3. per method: inference at 800x1066 (eager, fast path, fast path in bfloat16, and with the
   transformer compiled) and a training step of the paper configuration, images per second;
4. the machine: GPU, driver, torch, torchvision, numba, numba-cuda.

The whole run keeps to a time budget (5 minutes, ``quick``: 2): what would not fit is left
out and the report says so. With ``simulate`` only part 1 runs, at tiny shapes, under
Numba's CUDA simulator on the CPU (no GPU needed): how the tests run it.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .gpu_checks import DEFORM_ATTN_SHAPES, plan_checks

# the compiled pass goes first where compiling measured a gain on the CPU
# (docs/benchmarks.md); a compile takes tens of seconds, so the budget may stop it early
COMPILE_ORDER = ("deformable", "efficient", "detr", "conditional", "anchor", "sparse-rcnn",
                 "dynamic")


class NoCuda(RuntimeError):
    """No CUDA GPU to run on; the message says why in one line."""


@dataclass
class GpuPlan:
    """What one run measures, and in how much time."""
    quick: bool = False
    simulate: bool = False
    compile: bool = True
    budget_s: float = 300.0
    repeat: int = 10
    archs: tuple[str, ...] = ()
    infer_modes: tuple[str, ...] = ("eager", "fast", "fast+bf16")
    train_modes: tuple[str, ...] = ("eager", "bf16+channels_last")
    attn_cases: dict = field(default_factory=dict)    # timing shapes of deformable attention
    conv_shapes: dict = field(default_factory=dict)   # ... and of deformable convolution
    size: tuple[int, int] = (800, 1066)               # the models' input (and training's)
    overrides: dict = field(default_factory=dict)     # arch -> config changes (tests: tiny)
    checks: list | None = None                        # default: plan_checks(simulate)


def make_plan(quick: bool = False, simulate: bool = False, compile: bool | None = None,
              archs: list[str] | None = None) -> GpuPlan:
    """The full run (5 minutes on an H100-class GPU), ``quick`` (2 minutes: the paper's
    shapes only, fewer repeats, the fast path in float32 and bfloat16, a bfloat16 training
    step, nothing compiled) or ``simulate`` (part 1 at tiny shapes)."""
    from ..models.registry import ARCHS
    from .bench_deform_conv import DEFORM_CONV_SHAPES

    names = tuple(archs or ARCHS)
    if simulate:
        return GpuPlan(quick=quick, simulate=True, compile=False, budget_s=120, archs=())
    attn = {k: dict(v) for k, v in DEFORM_ATTN_SHAPES.items()}
    if quick:
        return GpuPlan(quick=True, compile=bool(compile), budget_s=110, repeat=3, archs=names,
                       infer_modes=("fast", "fast+bf16"), train_modes=("bf16+channels_last",),
                       attn_cases={k: v for k, v in attn.items() if k.startswith("paper")},
                       conv_shapes={"paper": DEFORM_CONV_SHAPES["paper"]})
    # a margin under 5 minutes for starting CUDA and writing the report
    return GpuPlan(compile=True if compile is None else compile, budget_s=270, archs=names,
                   attn_cases=attn, conv_shapes=dict(DEFORM_CONV_SHAPES))


def enable_simulator() -> None:
    """Switch Numba's CUDA target to its simulator for this process. It must happen before
    ``numba.cuda`` is first imported."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules:
        from numba.core import config

        config.reload_config()
    cuda = sys.modules.get("numba.cuda")
    if cuda is not None and not hasattr(cuda, "simulator"):
        raise RuntimeError("numba.cuda was imported before --simulate could switch it to the "
                           "simulator; run it in a fresh process")


def require_cuda(device: str = "cuda") -> torch.device:
    """``device`` when torch sees a CUDA GPU there, else :class:`NoCuda` saying why."""
    if not torch.cuda.is_available():
        build = (f"a CUDA {torch.version.cuda} build" if torch.version.cuda
                 else "a CPU-only build")
        raise NoCuda(f"no CUDA GPU: torch.cuda.is_available() is False (torch "
                     f"{torch.__version__}, {build}); `qdet bench gpu --simulate` checks the "
                     "kernels under Numba's CUDA simulator instead")
    dev = torch.device(device)
    if dev.type != "cuda" or (dev.index or 0) >= torch.cuda.device_count():
        raise NoCuda(f"{device} is not one of the {torch.cuda.device_count()} CUDA devices")
    return dev


# ------------------------------------------------------------------------ the machine


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _driver(index: int) -> str:
    """The NVIDIA driver's version (nvidia-smi) and the CUDA version it supports (Numba)."""
    found = ""
    if shutil.which("nvidia-smi"):
        lines = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        found = lines.splitlines()[index].strip() if len(lines.splitlines()) > index else ""
    try:
        from numba.cuda.cudadrv.driver import driver

        major, minor = driver.get_version()
        found += f"{' ' if found else ''}(CUDA {major}.{minor})"
    except Exception:  # noqa: BLE001 - the version is a nicety; the report says unknown
        pass
    return found or "unknown (no nvidia-smi, and Numba's driver did not start)"


def _qdet_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("qdet")
    except PackageNotFoundError:
        found = "not installed (run from source)"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(root, ".git")):      # a folder, or a worktree's file
        commit = _run(["git", "-C", root, "rev-parse", "--short", "HEAD"])
        if commit:
            found += f", source at commit {commit}"
    return found


def _cudnn() -> str:
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not v:
        return ""
    # 9.x counts major * 10000 + minor * 100 + patch, 8.x major * 1000 + minor * 100 + patch
    major, rest = (v // 10000, v % 10000) if v >= 90000 else (v // 1000, v % 1000)
    return f", cuDNN {major}.{rest // 100}.{rest % 100}"


def machine(device: torch.device, simulate: bool = False) -> dict[str, str]:
    """The facts a GPU report starts with, as label -> text."""
    import numba
    import torchvision

    from ..ops.backends import cuda_problem, numba_cuda_version
    from .bench import machine_description

    info = {}
    if simulate or device.type != "cuda":
        info["GPU"] = (f"none: {'Numba CUDA simulator' if simulate else 'numba backend'} on "
                       f"the CPU ({machine_description('cpu')})")
    else:
        props = torch.cuda.get_device_properties(device)
        info["GPU"] = (f"{props.name} (compute capability {props.major}.{props.minor}, "
                       f"{props.total_memory / 2**30:.1f} GiB)")
        info["driver"] = _driver(device.index or 0)
    info["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}{_cudnn()})"
    info["torchvision"] = torchvision.__version__
    ncuda = numba_cuda_version()
    info["numba"] = numba.__version__ + (f", numba-cuda {ncuda}" if ncuda else
                                         ", no numba-cuda (numba's built-in CUDA target)")
    problem = cuda_problem()
    info["Numba's CUDA kernels"] = "run" if problem is None else f"cannot run: {problem}"
    info["Python"] = f"{platform.python_version()} ({platform.machine()})"
    info["qdet"] = _qdet_version()
    info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    return info


# ---------------------------------------------------------------------------- the run


class _Budget:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Float32 products in float32, not TF32, while checking: the deformable convolution's
    weight product would otherwise bring TF32's 1e-3 into a float32 check."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_gpu_bench(plan: GpuPlan, device: str = "cuda",
                  log: Callable[[str], None] = lambda line: None) -> dict:
    """Run ``plan`` on the GPU ``device`` (under the simulator with ``plan.simulate``) and
    return what :func:`measure` returns. Raises :class:`NoCuda` without a GPU unless
    ``plan.simulate``."""
    if plan.simulate:
        enable_simulator()
        return measure(plan, torch.device("cpu"), log)
    return measure(plan, require_cuda(device), log)


def measure(plan: GpuPlan, dev: torch.device,
            log: Callable[[str], None] = lambda line: None) -> dict:
    """Run ``plan`` on ``dev`` with its kernel backend (``cuda`` on a GPU; the tests run it
    on the CPU with ``numba``) and return the results :func:`qdet.tools.gpu_report.render`
    writes: ``machine``, ``checks`` (dicts of :class:`CheckResult`), ``deform_attn`` and
    ``deform_conv`` timing rows, ``inference``, ``training`` and ``compiled`` rows,
    ``notes`` (what was left out, and why), ``plan`` and ``seconds``."""
    from ..ops.backends import cuda_kernels_strict
    from .gpu_checks import op_runner, run_checks, simulator_runner

    budget = _Budget(plan.budget_s)
    result: dict = {"plan": {"quick": plan.quick, "simulate": plan.simulate,
                             "compile": plan.compile, "budget_s": plan.budget_s,
                             "repeat": plan.repeat, "size": list(plan.size)},
                    "checks": [], "deform_attn": [], "deform_conv": [], "inference": [],
                    "training": [], "compiled": [], "notes": []}
    log("part 1: the CUDA kernels against their references")
    runner = simulator_runner if plan.simulate else \
        op_runner("cuda" if dev.type == "cuda" else "numba")
    with cuda_kernels_strict(), _full_float32():
        checks = run_checks(plan.checks if plan.checks is not None else
                            plan_checks(plan.simulate), dev, runner, log)
    result["checks"] = [c.as_dict() for c in checks]
    if not plan.simulate:
        _timings(plan, dev, result, budget, log)
        _models(plan, dev, result, budget, log)
    result["machine"] = machine(dev, plan.simulate)
    result["seconds"] = budget.elapsed()
    return result


def _timings(plan: GpuPlan, dev: torch.device, result: dict, budget: _Budget,
             log: Callable[[str], None]) -> None:
    """Part 2: each kernel against its references, forward and forward+backward."""
    from ..ops.backends import cuda_kernels_strict
    from .bench import bench_deform_attn
    from .bench_deform_conv import bench_deform_conv

    log("part 2: kernel times against the references")
    for key, bench in (("deform_attn", lambda: bench_deform_attn(
                            dev, plan.repeat, None, plan.attn_cases)),
                       ("deform_conv", lambda: bench_deform_conv(
                            dev, plan.repeat, plan.conv_shapes,
                            memory=dev.type == "cuda"))):  # the CPU's needs a process a row
        if not (plan.attn_cases if key == "deform_attn" else plan.conv_shapes):
            continue
        try:
            with cuda_kernels_strict():
                result[key] = bench()
        except Exception as e:  # noqa: BLE001 - reported; the models still run
            result["notes"].append(f"{key} timings failed: {_error(e)}")
        _free(dev)
        log(f"  {key}: done at {budget.elapsed():.0f} s")


def paper_batch(arch: str) -> int:
    """Images per GPU in the paper's recipe (the ``paper`` preset's batch size)."""
    from ..engine.presets import preset

    return int(preset(arch, "paper").train.get("batch_size", 2))


def _models(plan: GpuPlan, dev: torch.device, result: dict, budget: _Budget,
            log: Callable[[str], None]) -> None:
    """Part 3: per method, inference at 800x1066 and a training step of the paper
    configuration; then the compiled transformer while the budget lasts."""
    from .bench import bench_inference, bench_training

    log("part 3: models")
    notes, last = result["notes"], 20.0      # seconds a method took (a first guess)
    for i, arch in enumerate(plan.archs):
        if budget.left() < last * 1.2:
            notes.append(f"left out for the time budget: inference and training of "
                         f"{', '.join(plan.archs[i:])}")
            break
        t0 = time.monotonic()
        try:
            result["inference"] += bench_inference(arch, dev, plan.size, 1, plan.repeat,
                                                   modes=plan.infer_modes,
                                                   overrides=plan.overrides.get(arch))
            _free(dev)
            result["training"] += bench_training(arch, dev, paper_batch(arch), plan.size,
                                                 plan.repeat, plan.train_modes,
                                                 recipe="paper",
                                                 overrides=plan.overrides.get(arch))
        except Exception as e:  # noqa: BLE001 - reported; the next method still runs
            notes.append(f"{arch}: {_error(e)}")
        _free(dev)
        last = time.monotonic() - t0
        log(f"  {arch}: {last:.0f} s (at {budget.elapsed():.0f} s of {plan.budget_s:.0f})")
    if not plan.compile:
        notes.append("the compiled transformer was not measured (--quick, or --no-compile)")
        return
    last = 60.0                               # a compile takes tens of seconds
    order = [a for a in COMPILE_ORDER if a in plan.archs] + \
        [a for a in plan.archs if a not in COMPILE_ORDER]
    for i, arch in enumerate(order):
        if budget.left() < last * 1.2:
            notes.append("left out for the time budget: the compiled transformer of "
                         + ", ".join(order[i:]))
            break
        t0 = time.monotonic()
        try:
            rows = bench_inference(arch, dev, plan.size, 1, plan.repeat,
                                   modes=("fast+bf16",), compile=True,
                                   overrides=plan.overrides.get(arch))
            for row in rows:     # building, compiling and timing, all together
                row["wall_s"] = time.monotonic() - t0
            result["compiled"] += rows
        except Exception as e:  # noqa: BLE001
            notes.append(f"{arch} compiled: {_error(e)}")
        _free(dev)
        last = time.monotonic() - t0
        log(f"  {arch} compiled: {last:.0f} s (at {budget.elapsed():.0f} s)")
