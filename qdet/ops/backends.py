"""Which backend computes an op on a device, and the helpers every Numba kernel module
shares.

On the CPU the Numba kernels run (``numba``). On a GPU the Numba CUDA kernels run (``cuda``)
when Numba's CUDA target can start there: the ``numba-cuda`` package (``pip install
"qdet[cuda]"``), a driver and a toolkit it accepts. When it cannot, every op falls back to
its pure-PyTorch formulation (``torch``: the same results, slower, more memory) and one
warning names the cause, instead of a crash deep inside a kernel.
"""
from __future__ import annotations

import functools
import warnings

import numba
import numpy as np
import torch
from torch import Tensor


def as_numpy(t: Tensor) -> np.ndarray:
    """A CPU tensor's values as a contiguous NumPy array (no copy when already contiguous)."""
    return t.detach().contiguous().numpy()


def numba_threads() -> int:
    """Let Numba's parallel loops use as many threads as torch's intra-op pool (at most
    Numba's own limit); returns that number."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


@functools.lru_cache(maxsize=None)
def cuda_problem() -> str | None:
    """Why Numba's CUDA target cannot run kernels on this machine, or None when it can."""
    try:
        from numba import cuda
    except Exception as e:  # noqa: BLE001 - an import can fail in many ways
        return f"numba's CUDA target does not import ({type(e).__name__}: {e})"
    try:
        if cuda.is_available():
            return None
    except Exception as e:  # noqa: BLE001 - is_available should not raise; be sure
        return f"numba.cuda.is_available() failed ({type(e).__name__}: {e})"
    reason = ""
    try:
        cuda.cudadrv.driver.driver.ensure_initialized()
    except Exception as e:  # noqa: BLE001 - the driver's own reason, when it gives one
        reason = " ".join(str(e).split())[:200]
    return ("Numba cannot use the GPU" + (f": {reason}" if reason else "")
            + " (install qdet[cuda], i.e. numba-cuda for your CUDA version, and a driver "
              "it supports)")


_warned: set[str] = set()


def default_backend(device: torch.device) -> str:
    """``numba`` on the CPU; on a GPU ``cuda`` when Numba's CUDA target works, else ``torch``
    with one warning naming the cause."""
    if device.type == "cpu":
        return "numba"
    if device.type == "cuda":
        problem = cuda_problem()
        if problem is None:
            return "cuda"
        if problem not in _warned:
            _warned.add(problem)
            warnings.warn(f"{problem}; deformable attention and convolution fall back to "
                          "their PyTorch formulations", stacklevel=3)
    return "torch"
