"""What the readers of released checkpoints share (``qdet.weights.official`` and its DINO
part): COCO's categories, a ResNet's depth from its keys, layer counts, the training
arguments' matcher and loss weights, and renamings every layout needs.

Official releases are COCO models: their labels are COCO's category ids (91-way DETR-style
heads) or COCO's 80 categories in order (detectron2 models), see :func:`coco_labels`.
"""
from __future__ import annotations

import re

from ..blocks.base import LossConfig

# COCO 2017 detection categories (id, name); ids run 1..90 with gaps.
COCO_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"),
    (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"),
    (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]


def coco_labels(num_classes: int) -> tuple[list[int], list[str]]:
    """Category ids and names of an official COCO release's labels: with 80 classes the
    labels are COCO's categories in order (detectron2 models), otherwise a label is the
    COCO category id itself (DETR-style models, 91 classes with unused ids)."""
    if num_classes == len(COCO_CATEGORIES):
        return [c for c, _ in COCO_CATEGORIES], [n for _, n in COCO_CATEGORIES]
    names = dict(COCO_CATEGORIES)
    return list(range(num_classes)), [names.get(i, "N/A") for i in range(num_classes)]


def resnet_from_keys(sd: dict, prefix: str) -> str:
    """Infer a torchvision ResNet's depth from its state-dict keys."""
    blocks = {int(m.group(1)) for k in sd
              if (m := re.match(re.escape(prefix) + r"layer3\.(\d+)\.", k))}
    n3 = max(blocks) + 1
    bottleneck = f"{prefix}layer1.0.conv3.weight" in sd
    table = {(False, 2): "resnet18", (False, 6): "resnet34",
             (True, 6): "resnet50", (True, 23): "resnet101"}
    if (bottleneck, n3) not in table:
        raise ValueError(f"unrecognized ResNet under {prefix!r} ({n3} blocks in layer3)")
    return table[bottleneck, n3]


def count_layers(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def official_dilation(args: dict) -> bool:
    """DC5 or not: dilation leaves no trace in the weights, so read the checkpoint's args,
    else look for "dc5" in the file name (as the official releases are named)."""
    value = args.get("dilation")
    if isinstance(value, str):  # some scripts parsed the flag as a string
        return value.strip().lower() in ("true", "1", "yes")
    if value is None:
        return "dc5" in str(args.get("_filename", "")).lower()
    return bool(value)


def loss_from_args(args: dict, focal: bool, **extra) -> LossConfig:
    """The matcher and loss weights an official training script recorded in its ``args``
    (DETR-family flag names), defaulting to those repositories' defaults."""
    default_class = 2.0 if focal else 1.0
    return LossConfig(class_cost=args.get("set_cost_class", default_class),
                      bbox_cost=args.get("set_cost_bbox", 5.0),
                      giou_cost=args.get("set_cost_giou", 2.0),
                      class_weight=args.get("cls_loss_coef", default_class),
                      bbox_weight=args.get("bbox_loss_coef", 5.0),
                      giou_weight=args.get("giou_loss_coef", 2.0),
                      eos_coef=args.get("eos_coef", 0.1),
                      focal_alpha=args.get("focal_alpha", 0.25), **extra)


def rename_backbone(sd: dict) -> dict:
    """``backbone.0.body.*`` (DETR-style Joiner) -> ``backbone.body.*``."""
    return {re.sub(r"^backbone\.0\.", "backbone.", k): v for k, v in sd.items()}


def drop_profiler_keys(sd: dict) -> dict:
    """Some official checkpoints carry thop's ``total_params``/``total_ops`` counters."""
    return {k: v for k, v in sd.items() if not k.endswith(("total_params", "total_ops"))}


def d2_to_torchvision(key: str, prefix: str = "backbone.bottom_up.") -> str:
    """A detectron2 ResNet (and FPN) key under ``prefix`` -> torchvision's under
    ``backbone.body.`` (``fpn.*`` for the FPN's convs)."""
    p = re.escape(prefix)
    k = key.replace(prefix + "stem.conv1.norm.", "backbone.body.bn1.")
    k = k.replace(prefix + "stem.conv1.", "backbone.body.conv1.")
    k = re.sub(p + r"res(\d)\.", lambda m: f"backbone.body.layer{int(m.group(1)) - 1}.", k)
    k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
    k = k.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
    k = re.sub(r"backbone\.fpn_lateral(\d)\.",
               lambda m: f"fpn.inner_blocks.{int(m.group(1)) - 2}.0.", k)
    return re.sub(r"backbone\.fpn_output(\d)\.",
                  lambda m: f"fpn.layer_blocks.{int(m.group(1)) - 2}.0.", k)
