"""Official release checkpoints: which layout a state dict is in, and how to read it.

Per method, one small section: ``is_official(state_dict)`` recognises the official
repository's layout and ``convert(state_dict, args)`` returns ``(Config, qdet state dict)``.
Sizes come from tensor shapes and key names; what shapes cannot tell (attention heads,
dilation, matcher and loss weights) comes from the checkpoint's training ``args`` when it has
them, else from the official defaults. The checkpoint code reaches these through
:func:`read_official`; method files know nothing of them.

Official releases are COCO models: their labels are COCO's category ids (91-way DETR-style
heads) or COCO's 80 categories in order (detectron2 models), see :func:`coco_labels`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from ..blocks.base import LossConfig
from ..models import anchor_detr, conditional_detr, deformable_detr, detr, sparse_rcnn

# ------------------------------------------------------------------- shared knowledge

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


def _rename_backbone(sd: dict) -> dict:
    """``backbone.0.body.*`` (DETR-style Joiner) -> ``backbone.body.*``."""
    return {re.sub(r"^backbone\.0\.", "backbone.", k): v for k, v in sd.items()}


def _drop_profiler_keys(sd: dict) -> dict:
    """Some official checkpoints carry thop's ``total_params``/``total_ops`` counters."""
    return {k: v for k, v in sd.items() if not k.endswith(("total_params", "total_ops"))}


# ---------------------------------------------------------------- facebookresearch/detr


def detr_is_official(sd: dict) -> bool:
    return ("backbone.0.body.conv1.weight" in sd and "query_embed.weight" in sd
            and "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in sd)


def detr_convert(sd: dict, args: dict) -> tuple[detr.Config, dict]:
    if "backbone.1.row_embed.weight" in sd or args.get("position_embedding") == "learned":
        raise ValueError("this DETR checkpoint uses learned position embeddings; "
                         "qdet implements the sine encoding of the released models")
    if any(k.startswith("bbox_attention.") or k.startswith("detr.") for k in sd):
        raise ValueError("this is a DETR segmentation checkpoint; qdet loads detection models")
    cfg = detr.Config(
        num_classes=sd["class_embed.weight"].shape[0] - 1,
        backbone=resnet_from_keys(sd, "backbone.0.body."),
        dilation=official_dilation(args),
        d_model=sd["query_embed.weight"].shape[1],
        nheads=int(args.get("nheads", 8)),
        enc_layers=count_layers(sd, "transformer.encoder.layers."),
        dec_layers=count_layers(sd, "transformer.decoder.layers."),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        pre_norm="transformer.encoder.norm.weight" in sd,
        num_queries=sd["query_embed.weight"].shape[0],
        loss=loss_from_args(args, focal=False))
    return cfg, _rename_backbone(sd)


# ----------------------------------------------------------- Atten4Vis/ConditionalDETR


def conditional_is_official(sd: dict) -> bool:
    return ("backbone.0.body.conv1.weight" in sd
            and "transformer.decoder.layers.0.ca_qpos_sine_proj.weight" in sd)


def conditional_convert(sd: dict, args: dict) -> tuple[conditional_detr.Config, dict]:
    cfg = conditional_detr.Config(
        num_classes=sd["class_embed.weight"].shape[0],
        backbone=resnet_from_keys(sd, "backbone.0.body."),
        dilation=official_dilation(args),
        d_model=sd["query_embed.weight"].shape[1],
        nheads=int(args.get("nheads", 8)),
        enc_layers=count_layers(sd, "transformer.encoder.layers."),
        dec_layers=count_layers(sd, "transformer.decoder.layers."),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        num_queries=sd["query_embed.weight"].shape[0],
        loss=loss_from_args(args, focal=True))
    return cfg, _rename_backbone(sd)


# ------------------------------------------------------ fundamentalvision/Deformable-DETR


def deformable_is_official(sd: dict) -> bool:
    return ("backbone.0.body.conv1.weight" in sd and "transformer.level_embed" in sd
            and "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in sd)


def deformable_convert(sd: dict, args: dict) -> tuple[deformable_detr.Config, dict]:
    """Plain, box refinement, two-stage and single-scale checkpoints; heads, the points
    split, dilation and the query count (two-stage) from ``args`` when present."""
    levels, d = sd["transformer.level_embed"].shape
    heads = int(args.get("nheads", 8))

    def points(prefix):
        return sd[f"{prefix}.attention_weights.weight"].shape[0] // (levels * heads)

    two_stage = "transformer.enc_output.weight" in sd
    refine_ = "transformer.decoder.bbox_embed.0.layers.0.weight" in sd
    queries = (sd["query_embed.weight"].shape[0] if "query_embed.weight" in sd
               else int(args.get("num_queries", 300)))
    cfg = deformable_detr.Config(
        num_classes=sd["class_embed.0.weight"].shape[0],
        backbone=resnet_from_keys(sd, "backbone.0.body."),
        dilation=official_dilation(args),
        num_feature_levels=levels, d_model=d, nheads=heads,
        enc_layers=count_layers(sd, "transformer.encoder.layers."),
        dec_layers=count_layers(sd, "transformer.decoder.layers."),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        enc_n_points=points("transformer.encoder.layers.0.self_attn"),
        dec_n_points=points("transformer.decoder.layers.0.cross_attn"),
        num_queries=queries, with_box_refine=refine_, two_stage=two_stage,
        loss=loss_from_args(args, focal=True, enc_class_agnostic=two_stage))
    # the decoder's bbox_embed/class_embed are aliases of the top-level heads
    state = {k: v for k, v in sd.items()
             if not re.match(r"transformer\.decoder\.(bbox|class)_embed\.", k)}
    return cfg, _rename_backbone(_drop_profiler_keys(state))


# --------------------------------------------------------- megvii-research/AnchorDETR


def anchor_is_official(sd: dict) -> bool:
    return "backbone.body.conv1.weight" in sd and "transformer.pattern.weight" in sd


def anchor_convert(sd: dict, args: dict) -> tuple[anchor_detr.Config, dict]:
    """Dilation (C5 vs DC5, identical keys) from ``args.dilation``, else from "dc5" in the
    file name."""
    if "transformer.level_embed.weight" in sd or any(".level_fc." in k for k in sd):
        raise ValueError("multi-level Anchor DETR checkpoints are not supported (no official "
                         "release uses them); qdet loads the single-level C5/DC5 models")
    d = sd["transformer.pattern.weight"].shape[1]
    rcda = sd["transformer.encoder_layers.0.self_attn.in_proj_weight"].shape[0] == 5 * d
    learned = "transformer.position.weight" in sd
    cfg = anchor_detr.Config(
        num_classes=sd["transformer.class_embed.0.weight"].shape[0],
        backbone=resnet_from_keys(sd, "backbone.body."), dilation=official_dilation(args),
        d_model=d, nheads=int(args.get("nheads", 8)),
        enc_layers=count_layers(sd, "transformer.encoder_layers."),
        dec_layers=count_layers(sd, "transformer.decoder_layers."),
        dim_feedforward=sd["transformer.encoder_layers.0.ffn.linear1.weight"].shape[0],
        num_anchors=(sd["transformer.position.weight"].shape[0] if learned
                     else int(args.get("num_query_position", 289))),
        num_patterns=sd["transformer.pattern.weight"].shape[0],
        spatial_prior="learned" if learned else "grid",
        attention="rcda" if rcda else "standard",
        loss=loss_from_args(args, focal=True))
    return cfg, _drop_profiler_keys(sd)


# ------------------------------------------------- PeizeSun/SparseR-CNN (detectron2)


def sparse_rcnn_is_official(sd: dict) -> bool:
    return "init_proposal_boxes.weight" in sd and "backbone.bottom_up.stem.conv1.weight" in sd


def _d2_to_torchvision(key: str) -> str:
    k = key.replace("backbone.bottom_up.stem.conv1.norm.", "backbone.body.bn1.")
    k = k.replace("backbone.bottom_up.stem.conv1.", "backbone.body.conv1.")
    k = re.sub(r"backbone\.bottom_up\.res(\d)\.",
               lambda m: f"backbone.body.layer{int(m.group(1)) - 1}.", k)
    k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
    k = k.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
    k = re.sub(r"backbone\.fpn_lateral(\d)\.",
               lambda m: f"fpn.inner_blocks.{int(m.group(1)) - 2}.0.", k)
    return re.sub(r"backbone\.fpn_output(\d)\.",
                  lambda m: f"fpn.layer_blocks.{int(m.group(1)) - 2}.0.", k)


def sparse_rcnn_convert(sd: dict, args: dict) -> tuple[sparse_rcnn.Config, dict]:
    state = {_d2_to_torchvision(k): v for k, v in sd.items()
             if not k.startswith(("pixel_mean", "pixel_std"))}
    head = "head.head_series.0."
    d = sd["init_proposal_features.weight"].shape[1]

    def branch_layers(name):
        return sum(1 for k in sd if re.match(re.escape(head) + name + r"\.\d+\.weight$", k)
                   and sd[k].dim() == 2)

    cfg = sparse_rcnn.Config(
        num_classes=sd[head + "class_logits.weight"].shape[0],
        backbone=resnet_from_keys(state, "backbone.body."),
        d_model=d, num_proposals=sd["init_proposal_boxes.weight"].shape[0],
        num_heads=count_layers(sd, "head.head_series."),
        dim_feedforward=sd[head + "linear1.weight"].shape[0],
        dim_dynamic=sd[head + "inst_interact.norm1.weight"].shape[0],
        num_cls=branch_layers("cls_module"), num_reg=branch_layers("reg_module"),
        pooler_resolution=round(math.sqrt(sd[head + "inst_interact.out_layer.weight"].shape[1]
                                          / d)),
        nheads=int(args.get("nheads", 8)))
    return cfg, state


# ------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class OfficialFormat:
    """How one architecture's official release layout is recognised and read."""
    is_official: Callable[[dict], bool]
    convert: Callable[[dict, dict], tuple]   # (state dict, args) -> (Config, state dict)


FORMATS: dict[str, OfficialFormat] = {
    "detr": OfficialFormat(detr_is_official, detr_convert),
    "conditional": OfficialFormat(conditional_is_official, conditional_convert),
    "deformable": OfficialFormat(deformable_is_official, deformable_convert),
    "anchor": OfficialFormat(anchor_is_official, anchor_convert),
    "sparse-rcnn": OfficialFormat(sparse_rcnn_is_official, sparse_rcnn_convert),
}


def official_arch(sd: dict) -> str | None:
    """Which architecture's official release layout ``sd`` is in, if any."""
    return next((arch for arch, f in FORMATS.items() if f.is_official(sd)), None)


def read_official(sd: dict, args: dict) -> tuple[str, object, dict]:
    """An official state dict and its ``args`` -> ``(arch, Config, qdet state dict)``; raises
    ValueError when the layout is no known release's."""
    arch = official_arch(sd)
    if arch is None:
        raise ValueError(f"the state dict's keys match no architecture's official layout "
                         f"(first keys: {list(sd)[:4]})")
    cfg, state = FORMATS[arch].convert(sd, args)
    return arch, cfg, state
