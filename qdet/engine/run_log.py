"""A run folder a person can read while it trains.

After every epoch rank 0 rewrites ``results.csv`` (one row per epoch, from the rows of
``metrics.jsonl``) and sends the rows to a drawing process that renders ``curves.png``
(``qdet.engine.plots``) at low priority: the training loop never waits for a figure nor
shares its interpreter lock with one (matplotlib draws in Python, and the training thread
needs the lock to launch every op), and a figure that fails is a warning, once, never a
failed run. ``--tensorboard`` adds TensorBoard scalars (``RUN/tensorboard``) when the
package is installed.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from pathlib import Path

from ..common.files import write_atomic
from ..common.terminal import err
from .run_folder import COCO, RunFolder, csv_text


def check_tensorboard() -> None:
    """Raise a one-line error when ``--tensorboard`` cannot work here."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install "
                         "'qdet[tensorboard]' (or pip install tensorboard), or drop "
                         "--tensorboard; results.csv and curves.png are written "
                         "either way") from None


def _draw_curves(rows_queue, path: Path, title: str, parent: int) -> None:
    """The drawing process: draws the newest rows it was sent, until it is sent None or its
    parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; it closes us
    try:
        os.nice(10)  # the training process comes first
    except (AttributeError, OSError):
        pass
    from . import plots

    warned, done = False, False
    while not done:
        try:
            items = [rows_queue.get(timeout=2)]
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        try:
            while True:
                items.append(rows_queue.get_nowait())
        except queue.Empty:
            pass
        done = any(i is None for i in items)
        rows = [i for i in items if i is not None]
        if not rows:
            continue
        try:
            plots.curves(rows[-1], path, title)
        except Exception as e:  # noqa: BLE001 - a figure must never stop training
            if not warned:
                warned = True
                _warn(f"{path}", e)


def _warn(what: str, error: BaseException) -> None:
    from rich.markup import escape

    err.print(f"[yellow]warning:[/] could not write {escape(what)} ({type(error).__name__}: "
              f"{escape(str(error))}); training goes on", highlight=False, soft_wrap=True)


class RunLog:
    """Rank 0's writer of ``results.csv``, ``curves.png`` and TensorBoard scalars.

    ``rows`` are the epochs so far (``restore_rows``); ``add_epoch`` appends one.
    ``close`` waits for the last figure.
    """

    def __init__(self, out: Path, rows: list[dict], title: str, tensorboard: bool = False):
        self.out, self.rows, self.title = Path(out), list(rows), title
        self._warned: set[str] = set()
        self._queue = self._proc = None
        try:  # fork where there is one (as DataLoader workers do): no re-import, instant
            ctx = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            self._queue = ctx.Queue()
            self._proc = ctx.Process(target=_draw_curves, name="qdet-curves", daemon=True,
                                     args=(self._queue, RunFolder(self.out).curves, title,
                                           os.getpid()))
            self._proc.start()
        except (OSError, ValueError) as e:
            self.warn_once("curves.png", e)
            self._queue = self._proc = None
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(RunFolder(self.out).tensorboard))

    def warn_once(self, what: str, error: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            _warn(what, error)

    def add_step(self, step: int, loss: float, lr: float) -> None:
        """One optimization step's loss and lr (TensorBoard only; values already on the
        host, so this costs the device nothing)."""
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)

    def add_epoch(self, metrics: dict) -> None:
        """Rewrite results.csv with the new row and have curves.png redrawn."""
        self.rows.append(dict(metrics))
        try:
            write_atomic(RunFolder(self.out).results_csv, csv_text(self.rows))
        except OSError as e:
            self.warn_once("results.csv", e)
        if self._queue is not None:
            self._queue.put(list(self.rows))  # a feeder thread sends it; never blocks
        if self.tb is not None:
            step = metrics.get("step", metrics["epoch"])
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    group = "val" if k in COCO or k.startswith("AR") else \
                        "loss" if k.startswith("loss") else "run"
                    self.tb.add_scalar(f"{group}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        """Wait (at most two minutes) for the last figure; close TensorBoard."""
        if self._proc is not None:
            self._queue.put(None)
            self._proc.join(timeout=120)
            if self._proc.is_alive():
                self._proc.terminate()
            self._queue.close()
            self._queue.join_thread()
            self._proc = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
