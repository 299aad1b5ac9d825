"""What stops a training run part-way, said in one line: where, why, and which checkpoint to
continue from (``--resume``); under torchrun also a peer that vanished mid-collective and
the SIGTERM torchrun sends every process once one has failed.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.errors import DataError
from ..weights.checkpoint import CheckpointError


class TrainingStopped(Exception):
    """Training stopped part-way: a loss, cost or weight that is not finite, an image that
    cannot be decoded, a checkpoint that cannot be written, a lost torchrun peer. The
    message says where, why and which checkpoint to continue from; under torchrun it names
    the rank, and each rank that meets it says so (it may be the only one)."""


class NonFinite(TrainingStopped, FloatingPointError):
    pass


class BadImage(TrainingStopped, DataError):
    pass


class WriteFailed(TrainingStopped, CheckpointError):
    pass


class PeerLost(TrainingStopped, RuntimeError):
    pass


def resume_note(out: Path | None) -> str:
    """Where a stopped run can continue from: its last.pt, if one was written."""
    last = None if out is None else Path(out) / "last.pt"
    if last is None:
        return "nothing was trained yet"
    if not last.is_file():
        return "no checkpoint was written yet"
    try:  # mmap: the epoch without reading the tensors
        epoch = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # noqa: BLE001 - the note is a courtesy; never hide the error itself
        epoch = "?"
    return (f"the last complete checkpoint is {last} (epoch {epoch}); continue from it with "
            f"--resume --out {out}")


def is_comm_error(e: BaseException) -> bool:
    """Whether ``e`` comes from torch.distributed losing a peer (gloo/nccl/the store)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed",
                                   "Broken pipe", "connection refused"))


@contextlib.contextmanager
def stopping_clearly(rank: int | None = None, world: int | None = None,
                     out: Path | None = None):
    """Turn what stops a run part-way into one line that says where, why and what to resume
    from (``out``: the run folder, once training started); under torchrun, also a peer that
    vanished mid-collective and the SIGTERM torchrun sends every process once one has failed
    (which would otherwise end this one without a word). Rank and world default to
    torchrun's environment, so that it also decorates a whole run (``qdet.engine.runs.fit``)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    who = f"rank {rank} of {world}: " if world > 1 else ""
    previous = None

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: say why, then exit
        raise PeerLost(f"{who}stopped by SIGTERM, which torchrun sends to every process "
                       f"once one has failed; {resume_note(out)}")
    if world > 1 and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except TrainingStopped:
        raise
    except (FloatingPointError, DataError, CheckpointError) as e:
        if out is None:  # not training yet: a data check's or a resume's own message
            raise
        if isinstance(e, FloatingPointError):
            raise NonFinite(f"{who}{e}. {resume_note(out)}") from None
        if isinstance(e, DataError):
            raise BadImage(f"{who}{e} (found while training); {resume_note(out)}"
                           ) from None
        raise WriteFailed(f"{who}{e}; {resume_note(out)}") from None
    except RuntimeError as e:
        if world > 1 and is_comm_error(e):
            reason = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", " ".join(str(e).split()))
            reason = reason.split(". ")[0][:160]  # gloo's "Read error ...: Connection reset" 
            raise PeerLost(f"{who}lost contact with the other processes of the run (another "
                           f"one ended or hung: {reason}); {resume_note(out)}") from None
        raise
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) is terminated:
            signal.signal(signal.SIGTERM, previous)  # (left ignored once it has come)
