"""Evaluation, shared by every method and by training: COCO-style predictions on a dataset
(one process, or shared by the torchrun ranks), pycocotools metrics and their table."""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Subset

from ..blocks.base import Detector, class_key, postprocess
from ..common.terminal import progress_bar
from ..data.datasets import DetectionDataset, collate

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def unwrap(model) -> Detector:
    return model.module if hasattr(model, "module") else model


@dataclass
class ClassMatch:
    """How a model's classes map onto a dataset's categories."""
    category_of: list[int | None]   # per model label: the data's category id, None if absent
    cat_ids: list[int] | None       # the data's categories that AP is computed over (None: all)
    note: str | None                # what differs, to tell the user; None when nothing does


def match_classes(model: Detector, dataset: DetectionDataset) -> ClassMatch:
    """By id when every category of the data is a class of the model with the same id and
    name (a COCO model on COCO, a run on its own data); else by name: the classes whose
    names match (``qdet.blocks.base.class_key``, as fine-tuning matches them) are
    evaluated, under the data's ids, and AP is over those categories only. Raises
    ValueError when no name matches (the model was trained for other data)."""
    model_pairs = list(zip(model.category_ids, model.class_names))
    data_pairs = list(zip(dataset.category_ids, dataset.class_names))
    model_keys = {(cid, class_key(name)) for cid, name in model_pairs}
    if all((cid, class_key(name)) in model_keys for cid, name in data_pairs):
        return ClassMatch(list(model.category_ids), None, None)
    data_id = {}
    for cid, name in data_pairs:
        data_id.setdefault(class_key(name), cid)
    category_of = [data_id.get(class_key(name)) for name in model.class_names]
    matched = [(mid, name, cid) for (mid, name), cid in zip(model_pairs, category_of)
               if cid is not None]

    def some(names):
        return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    if not matched:
        raise ValueError(
            f"{dataset.source}: none of its {len(data_pairs)} categories "
            f"({some([n for _, n in data_pairs])}) is a class of the model "
            f"({some(model.class_names)}): it was trained for other data")
    renumbered = [f"{name} {mid}->{cid}" for mid, name, cid in matched if mid != cid]
    found = {class_key(name) for _, name, _ in matched}
    left_out = [n for _, n in data_pairs if class_key(n) not in found]
    note = (f"the model's classes differ from {dataset.source}'s categories: evaluating by "
            f"class name the {len(matched)} that match"
            + (f" (ids differ: {some(renumbered)})" if renumbered else "")
            + (f"; left out of AP, not classes of the model: {some(left_out)}"
               if left_out else ""))
    return ClassMatch(category_of, sorted({cid for _, _, cid in matched}), note)


def _shard(dataset, rank: int, world: int):
    return dataset if world == 1 else Subset(dataset, list(range(rank, len(dataset), world)))


@torch.no_grad()
def predict_dataset(model: Detector, dataset: DetectionDataset, device, batch_size: int = 8,
                    num_workers: int = 0, show_progress: bool = True,
                    bf16: bool = False) -> list[dict]:
    """COCO-style results (original image ids, the data's category ids as
    :func:`match_classes` maps them, xywh boxes) for a dataset; under torchrun each rank
    runs its share and rank 0 receives all."""
    model.eval()
    net = unwrap(model)
    base = dataset.dataset if isinstance(dataset, Subset) else dataset  # (a timed warm-up's)
    category_of = match_classes(net, base).category_of
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    loader = DataLoader(_shard(dataset, rank, world), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate)
    results = []
    with progress_bar(disable=not (show_progress and is_main())) as bar:
        task = bar.add_task("eval", total=len(loader), info="")
        for images, targets in loader:
            images = [im.to(device) for im in images]
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                outputs = model(images)
            sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
            dets = postprocess(outputs, sizes, net.focal, net.max_detections)
            for t, det in zip(targets, dets):
                for s, lab, (x0, y0, x1, y1) in zip(det["scores"].tolist(), det["labels"].tolist(),
                                                    det["boxes"].tolist()):
                    if category_of[lab] is not None:
                        results.append({"image_id": t["image_id"],
                                        "category_id": category_of[lab],
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
            bar.advance(task)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        results = [r for part in gathered for r in part] if rank == 0 else []
    return results


def coco_eval(dataset: DetectionDataset, results: list[dict],
              cat_ids: list[int] | None = None,
              image_ids: list[int] | None = None) -> COCOeval | None:
    """pycocotools' bbox evaluation of ``results`` over ``cat_ids`` (default: every category
    of the data) and ``image_ids`` (default: every image), evaluated, accumulated and
    summarized (``.stats``, and ``.eval['precision']`` per IoU, recall, category, area and
    max detections); None when there is no detection at all."""
    if not results:
        return None
    gt = dataset.coco_gt()
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds fields in place
        ev = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        if image_ids is not None:
            ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def stats_of(ev: COCOeval | None) -> dict[str, float]:
    """The summary metrics of a ``coco_eval`` (all zeros for None)."""
    if ev is None:
        return {k: 0.0 for k in STAT_NAMES}
    return {k: max(float(v), 0.0) for k, v in zip(STAT_NAMES, ev.stats)}


def coco_stats(dataset: DetectionDataset, results: list[dict],
               cat_ids: list[int] | None = None,
               image_ids: list[int] | None = None) -> dict[str, float]:
    """pycocotools bbox metrics over ``cat_ids`` and ``image_ids`` (default: all of the
    data's); all zeros when there is no detection at all."""
    return stats_of(coco_eval(dataset, results, cat_ids, image_ids))


def evaluate(model: Detector, dataset: DetectionDataset, device, batch_size: int = 8,
             num_workers: int = 0, show_progress: bool = True, bf16: bool = False):
    """Returns ``(stats, results)``; stats are only meaningful on rank 0."""
    results = predict_dataset(model, dataset, device, batch_size, num_workers, show_progress,
                              bf16)
    cat_ids = match_classes(unwrap(model), dataset).cat_ids
    stats = coco_stats(dataset, results, cat_ids) if is_main() else {}
    return stats, results
