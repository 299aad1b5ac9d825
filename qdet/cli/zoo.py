"""``qdet zoo``: the released detectors qdet loads by name, and where each comes from."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from ..common.terminal import console
from .common import fail


def zoo_table(cached: dict[str, bool]) -> Table:
    """Name, method, backbone, COCO AP, size, source kind and cached or not: short columns,
    so that it reads at 80 columns with nothing cut."""
    from ..weights.zoo import ENTRIES

    table = Table(title="pretrained detectors (qdet zoo NAME: source and cache path)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col, justify in (("name", "left"), ("method", "left"), ("backbone", "left"),
                         ("AP", "right"), ("size", "right"), ("source", "left"),
                         ("cached", "left")):
        table.add_column(col, justify=justify, no_wrap=True)
    for e in ENTRIES:
        table.add_row(e.name, e.method, e.backbone, f"{e.ap:.1f}",
                      f"{e.size_mb} MB" if e.size_mb else "-", e.kind,
                      "yes" if cached[e.name] else "no")
    return table


def zoo(name: Annotated[Optional[str], typer.Argument(
        help="One entry: its source, file, checksum and cache path.")] = None):
    """List the pretrained detectors that `qdet.load`, `--weights`, `eval` and `predict`
    accept by name; downloads go to $QDET_HOME/checkpoints (default ~/.cache/qdet), Hub
    models to the Hugging Face cache."""
    from ..weights.zoo import ZOO, ZooError, cache_path, is_cached, resolve

    if name is None:
        console.print(zoo_table({n: is_cached(e) for n, e in ZOO.items()}))
        console.print("the AP is the COCO val2017 box AP each release reports; hf: entries "
                      "come from the Hugging Face Hub, 'by hand' ones have no direct link")
        return
    if name not in ZOO:
        try:
            resolve(name)
        except (ZooError, FileNotFoundError) as e:
            fail(str(e))
        fail(f"{name!r} is a path, not a zoo name")
    e = ZOO[name]
    rows = [("method", f"{e.method} ({e.backbone})"), ("COCO AP", f"{e.ap:.1f} (reported)"),
            ("source", e.source)]
    if e.file:
        rows += [("file", e.file), ("cache", str(cache_path(e)))]
    if e.sha256:
        rows.append(("sha256", f"{e.sha256}... (checked after download)"))
    if e.size_mb:
        rows.append(("size", f"{e.size_mb} MB (as the release states it)"))
    if e.note:
        rows.append(("note", e.note))
    rows.append(("cached", "yes" if is_cached(e) else "no"))
    table = Table(title=name, box=box.SIMPLE, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
