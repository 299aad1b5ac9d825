"""Every figure qdet draws: a run's curves, the confusion matrix, precision-recall curves and
the overlay of several runs.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``) and rendered by
its Agg canvas: no window, no pyplot state, so drawing works headless, from a background
thread, and never changes the backend of a user's own pyplot session. Each PNG is written
through a temporary file (a reader never sees half an image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common.files import atomic_path
from .run_folder import TERMS, layer_terms, num_layers


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _line(ax, xs, ys, **kw):
    """A line with markers while points are few enough to tell apart (one epoch is a dot)."""
    kw.setdefault("marker", "o" if len(xs) <= 40 else None)
    kw.setdefault("markersize", 3)
    ax.plot(xs, ys, **kw)


def _column(rows: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def curves(rows: list[dict], path: Path, title: str = "") -> None:
    """``curves.png``: top, the weighted training loss (and the encoder's and the denoising
    queries'), validation AP and AP50, the lr; below, each loss term per decoder layer
    (light: early layers, black: the final one, dashed: the encoder's proposals, dotted: the
    denoising queries' final layer), all against the epoch."""
    import matplotlib as mpl

    fig, ax = _figure(13, 7, 2, 3)
    _line(ax[0, 0], *_column(rows, "loss"), color="black", label="loss (weighted sum)")
    if any("loss_dn" in r for r in rows):
        _line(ax[0, 0], *_column(rows, "loss_dn"), color="tab:red", linestyle=":",
              label="denoising (weighted)")
    if any("loss_enc" in r for r in rows):
        _line(ax[0, 0], *_column(rows, "loss_enc"), color="tab:gray", linestyle="--",
              label="encoder (weighted)")
    ax[0, 0].set_title("training loss")
    for key, color in (("AP", "tab:blue"), ("AP50", "tab:orange"), ("AP75", "tab:green")):
        xs, ys = _column(rows, key)
        if xs:
            _line(ax[0, 1], xs, ys, color=color, label=key)
    ax[0, 1].set_title("validation COCO AP")
    ax[0, 1].set_ylim(bottom=0)
    _line(ax[0, 2], *_column(rows, "lr"), color="tab:purple")
    ax[0, 2].set_title("learning rate (end of epoch)")
    ax[0, 2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    layers = num_layers(rows)
    cmap = mpl.colormaps["viridis_r"]
    for col, term in enumerate(TERMS):
        a = ax[1, col]
        for i in range(layers - 1):
            _line(a, *_column(rows, f"loss_{term}_{i}"), linewidth=1,
                  color=cmap(0.15 + 0.6 * i / max(layers - 1, 1)), label=f"layer {i + 1}")
        _line(a, *_column(rows, f"loss_{term}"), color="black",
              label=f"layer {layers} (final)")
        if any(f"loss_{term}_dn" in r for r in rows):
            _line(a, *_column(rows, f"loss_{term}_dn"), color="tab:red", linestyle=":",
                  linewidth=1, label="denoising (final layer)")
        if any(f"loss_{term}_enc" in r for r in rows):
            _line(a, *_column(rows, f"loss_{term}_enc"), color="tab:gray", linestyle="--",
                  linewidth=1, label="encoder")
        a.set_title(f"loss_{term} per decoder layer")
    from matplotlib.ticker import MaxNLocator

    for a in ax.flat:
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0] and a is not ax[1, 1] and a is not ax[1, 2]:
            a.legend(fontsize=8)
    if not layer_terms(rows[-1]):
        ax[1, 0].text(0.5, 0.9, "one decoder layer (no auxiliary losses)", ha="center",
                      transform=ax[1, 0].transAxes, fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def confusion(matrix: np.ndarray, names: list[str], path: Path, title: str = "") -> None:
    """``confusion.png``: ``matrix [K+1, K+1]`` of counts (rows: true class, columns:
    predicted; the last of each is background), coloured by the share of its row."""
    k = len(names) + 1
    side = min(max(5.0, 0.45 * k + 2.5), 30.0)
    fig, ax = _figure(side + 1, side)
    ax = ax[0, 0]
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    labels = list(names) + ["background"]
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8 if k <= 30 else 5)
    ax.set_yticks(range(k), labels, fontsize=8 if k <= 30 else 5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                            fontsize=8, color="white" if share[i, j] > 0.6 else "black")
    ax.figure.colorbar(im, ax=ax, shrink=0.8, label="share of the row")
    ax.set_title(title)
    _save(fig, path)


def pr_curves(recall: np.ndarray, precision: np.ndarray, names: list[str], ap50: list,
              path: Path, title: str = "") -> None:
    """``pr.png``: precision against recall at IoU 0.5, per class (``precision [K, R]``,
    rows of -1 for classes without targets) and their mean."""
    fig, ax = _figure(7, 5.5)
    ax = ax[0, 0]
    have = [i for i in range(len(names)) if (precision[i] > -1).any()]
    many = len(have) > 12
    for i in have:
        kw = dict(color="tab:gray", linewidth=0.6, alpha=0.6) if many else \
            dict(linewidth=1.2, label=f"{names[i]} ({ap50[i]:.3f})")
        ax.plot(recall, np.clip(precision[i], 0, None), **kw)
    if have:
        mean = np.clip(precision[have], 0, None).mean(0)
        ax.plot(recall, mean, color="black", linewidth=2.2,
                label=f"all classes ({np.mean([ap50[i] for i in have]):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="class (AP50)", title_fontsize=8, loc="lower left")
    ax.set_title(title)
    _save(fig, path)


def overlay(lines: list[tuple[str, list, list]], xlabel: str, ylabel: str, path: Path,
            title: str = "") -> None:
    """Several runs' ``(label, xs, ys)`` in one axes (``qdet plot``)."""
    fig, ax = _figure(9, 5.5)
    ax = ax[0, 0]
    for label, xs, ys in lines:
        _line(ax, xs, ys, label=label, linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xlabel != "epoch":  # time and images both start from nothing
        ax.set_xlim(left=0)
    if ylabel.startswith("A"):
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    # beside the axes, not over them: rising curves fill the corners a legend would take
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(title)
    _save(fig, path)
