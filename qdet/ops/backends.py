"""Which backend computes an op on a device, and the helpers every Numba kernel module
shares.

On the CPU the Numba kernels run (``numba``). On a GPU the Numba CUDA kernels run (``cuda``)
when Numba's CUDA target can start there: the ``numba-cuda`` package (``pip install
"qdet[cuda]"`` for CUDA 13, ``"qdet[cuda12]"`` for CUDA 12), a driver it accepts and the
libNVVM compiler. When it cannot, every op falls back to its pure-PyTorch formulation
(``torch``: the same results, slower, more memory) and one warning names the cause, instead
of a crash deep inside a kernel.

Numba's CUDA target can fail at two moments, and both lead to the same fallback:

- at start-up (:func:`cuda_problem`): numba's CUDA module does not import, no driver, a
  driver too old for the toolkit, no libNVVM, no device;
- at a kernel's first compile, load or launch (:func:`run_cuda`), which
  ``numba.cuda.is_available()`` cannot foresee: libNVVM that loads but does not compile, a
  GPU newer than the toolkit knows, PTX newer than the driver, too few registers for the
  launch. The op that met it computes its result with the PyTorch formulation, and every
  later op takes that formulation directly.

An error that leaves the GPU context unusable (an illegal address from an earlier kernel) is
raised as it is: no formulation can run after it. ``qdet bench gpu`` and the GPU tests run
inside :func:`cuda_kernels_strict`, where a kernel that cannot run raises instead.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable, Iterator, TypeVar

import numba
import numpy as np
import torch
from torch import Tensor

T = TypeVar("T")


def as_numpy(t: Tensor) -> np.ndarray:
    """A CPU tensor's values as a contiguous NumPy array (no copy when already contiguous)."""
    return t.detach().contiguous().numpy()


def numba_threads() -> int:
    """Let Numba's parallel loops use as many threads as torch's intra-op pool (at most
    Numba's own limit); returns that number."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


# ------------------------------------------------------------- why CUDA cannot run

def _one_line(text: object, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def numba_cuda_version() -> str | None:
    """The installed ``numba-cuda`` package's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("numba-cuda")
    except PackageNotFoundError:
        return None


def _install_hint() -> str:
    installed = numba_cuda_version()
    extras = ('"qdet[cuda]" for CUDA 13 (driver >= 580) or "qdet[cuda12]" for CUDA 12 '
              '(driver >= 525), whichever torch.version.cuda names')
    if installed is None:
        return f"numba-cuda is not installed: pip install {extras}"
    return (f"numba-cuda {installed} is installed: its CUDA extra must match the driver, "
            f"pip install {extras}")


def _nvvm_reason() -> str:
    try:
        from numba.cuda.cudadrv import nvvm

        nvvm.NVVM()        # the library's loader: raises with the reason it cannot load
    except Exception as e:  # noqa: BLE001 - any failure here is the reason we report
        return _one_line(e)
    return "it loads, yet numba.cuda.is_available() is False"


@functools.lru_cache(maxsize=None)
def _startup_problem() -> str | None:
    if os.environ.get("NUMBA_DISABLE_CUDA", "0") not in ("", "0"):
        return "NUMBA_DISABLE_CUDA is set, which turns Numba's CUDA target off"
    try:
        from numba import cuda
    except Exception as e:  # noqa: BLE001 - an import can fail in many ways
        return (f"numba's CUDA module does not import ({type(e).__name__}: {_one_line(e)}); "
                + _install_hint())
    try:
        if cuda.is_available():
            if len(cuda.gpus) == 0:
                return "Numba's CUDA driver starts but sees no GPU (CUDA_VISIBLE_DEVICES?)"
            return None
        driver_error = cuda.cuda_error()
    except Exception as e:  # noqa: BLE001 - is_available should not raise; be sure
        return (f"numba.cuda.is_available() failed ({type(e).__name__}: {_one_line(e)}); "
                + _install_hint())
    if driver_error:
        return f"the CUDA driver does not start for Numba: {_one_line(driver_error)}; " \
               + _install_hint()
    # the driver started, so it is the compiler that is missing
    return f"libNVVM, the compiler of Numba's CUDA target, is not available " \
           f"({_nvvm_reason()}); " + _install_hint()


_kernel_failure: str | None = None     # why a kernel could not compile, load or launch
_strict = False
_warned: set[str] = set()


def cuda_problem() -> str | None:
    """Why Numba's CUDA kernels cannot run on this machine, or None when they can (as far as
    is known: a kernel's first compile and launch can still fail, see :func:`run_cuda`)."""
    return _kernel_failure or _startup_problem()


def _warn_once(problem: str) -> None:
    if problem not in _warned:
        _warned.add(problem)
        warnings.warn(f"{problem}; deformable attention and convolution fall back to their "
                      "PyTorch formulations", stacklevel=4)


def default_backend(device: torch.device) -> str:
    """``numba`` on the CPU; on a GPU ``cuda`` when Numba's CUDA target works, else ``torch``
    with one warning naming the cause."""
    if device.type == "cpu":
        return "numba"
    if device.type == "cuda":
        problem = cuda_problem()
        if problem is None:
            return "cuda"
        _warn_once(problem)
    return "torch"


# CUDA errors after which the context is lost (illegal address, launch failure, ...): an
# earlier kernel broke the process, and nothing, the fallback included, can run after them
_CONTEXT_LOST = {700, 702, 714, 715, 716, 717, 718, 719}


def _cannot_start(e: BaseException) -> bool:
    """Whether ``e`` is Numba failing to compile, load or launch a kernel here (which the
    PyTorch formulation avoids) rather than an error of the computation itself."""
    code = getattr(e, "code", None)
    try:
        if code is not None and int(code) in _CONTEXT_LOST:
            return False
    except (TypeError, ValueError):
        pass
    root = (type(e).__module__ or "").split(".")[0]
    return isinstance(e, ImportError) or root in ("numba", "numba_cuda")


def run_cuda(what: str, device: torch.device, kernel: Callable[[], T],
             fallback: Callable[[], T]) -> T:
    """``kernel()``, which launches Numba CUDA kernels for ``what`` on ``device``; when Numba
    cannot compile, load or launch them there, the cause is recorded, warned about once, and
    ``fallback()`` (the PyTorch formulation) gives the result, as it does for every later
    call. Inside :func:`cuda_kernels_strict` the error is raised instead."""
    global _kernel_failure
    if _kernel_failure is None or _strict:
        try:
            with torch.cuda.device(device) if device.type == "cuda" else \
                    contextlib.nullcontext():   # Numba launches in the current device's context
                return kernel()
        except Exception as e:
            if _strict or not _cannot_start(e):
                raise
            _kernel_failure = (f"Numba's CUDA kernels cannot run on this GPU ({what}: "
                               f"{type(e).__name__}: {_one_line(e)}); {_install_hint()}")
    _warn_once(_kernel_failure)
    return fallback()


@contextlib.contextmanager
def cuda_kernels_strict() -> Iterator[None]:
    """Inside, a Numba CUDA kernel that cannot compile, load or launch raises its error
    instead of falling back: for ``qdet bench gpu`` and the GPU tests, which must see the
    kernels themselves run."""
    global _strict
    before, _strict = _strict, True
    try:
        yield
    finally:
        _strict = before


def reset_cuda_problem() -> None:
    """Forget what is known of Numba's CUDA target (tests, and a process that installed
    numba-cuda since): the next op checks again and may warn again."""
    global _kernel_failure
    _kernel_failure = None
    _startup_problem.cache_clear()
    _warned.clear()
