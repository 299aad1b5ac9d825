"""Measurement (not a test): fine-tuning a pretrained detector against training from scratch.

    python tests/bench_finetune.py [--out bench-finetune] [--epochs 5] [--tiny]

1. The source: Conditional DETR trained on the built-in shapes data (`qdet train --arch
   conditional`, the quickstart: 5 classes, 10 epochs), or ``--source FILE`` if one exists.
2. A COCO-JSON dataset of other shapes (``qdet data shapes --categories``): rectangle,
   ellipse and triangle as before (same names, so their rows are copied), hexagon and ring
   new; another seed, so other images.
3. The same short run on it twice, the built-in preset's recipe and budget for both: from
   the source's weights (`qdet train --weights`), and from scratch.
It prints COCO AP / AP50 on the new data's validation split after every epoch for both, the
transfer summary and the wall times, as a Markdown table for docs/weights.md. ``--tiny`` runs
everything at a toy size, only to check that it works.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

KINDS = ("rectangle", "ellipse", "triangle", "hexagon", "ring")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-finetune")
    ap.add_argument("--source", help="a trained shapes model; default: train one here")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check the script")
    args = ap.parse_args()

    from qdet.data.shapes import ShapesConfig, write_coco
    from qdet.engine.runs import fit

    out = Path(args.out)
    tiny = {"shapes.train_images": 32, "shapes.val_images": 8, "num_workers": 0,
            "batch_size": 8} if args.tiny else {}
    if args.tiny:
        args.epochs, args.train_images, args.val_images = 2, 32, 16
    t0 = time.time()
    source = args.source
    if source is None:
        source_run = out / "source"
        if not (source_run / "best.pt").is_file():
            fit("conditional", out=str(source_run),
                train_overrides={**tiny, **({"epochs": 1} if args.tiny else {})})
        source = str(source_run / "best.pt")
    source_minutes = (time.time() - t0) / 60

    data = out / "variant"
    if not (data / "val.json").is_file():
        write_coco(ShapesConfig(categories=KINDS, train_images=args.train_images,
                                val_images=args.val_images, seed=1), data)
    common = dict(data=str(data / "train.json"), images=str(data / "train"),
                  val_data=str(data / "val.json"), val_images=str(data / "val"),
                  preset="shapes",
                  train_overrides={"epochs": args.epochs, "augment.train_scales": (128,),
                                   "augment.crop": False, "augment.eval_size": 128,
                                   **{k: v for k, v in tiny.items() if "." not in k}})
    runs, minutes = {}, {}
    for name, kwargs in (("fine-tuned", {"weights": source}), ("from scratch",
                                                              {"arch": "conditional"})):
        folder = out / name.replace(" ", "-")
        t0 = time.time()
        result = fit(out=str(folder), **kwargs, **common)
        minutes[name] = (time.time() - t0) / 60
        runs[name] = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        if result.get("weights"):
            summary = result["weights"]["summary"]

    print(f"\nsource: {source} ({source_minutes:.1f} min); transfer: {summary}")
    print(f"{args.train_images} training images of {', '.join(KINDS)}, "
          f"{args.val_images} validation images, {args.epochs} epochs\n")
    print("| epoch | from scratch AP | AP50 | fine-tuned AP | AP50 |")
    print("| --- | --- | --- | --- | --- |")
    for a, b in zip(runs["from scratch"], runs["fine-tuned"]):
        print(f"| {a['epoch']} | {a['AP']:.3f} | {a['AP50']:.3f} | {b['AP']:.3f} | "
              f"{b['AP50']:.3f} |")
    print(f"\nwall time: from scratch {minutes['from scratch']:.1f} min, fine-tuned "
          f"{minutes['fine-tuned']:.1f} min")


if __name__ == "__main__":
    main()
