"""Official release checkpoints: which layout a state dict is in, and how to read it.

Per method, one small section: ``is_official(state_dict)`` recognises the official
repository's layout and ``convert(state_dict, args)`` returns ``(Config, qdet state dict)``.
Sizes come from tensor shapes and key names; what shapes cannot tell (attention heads,
dilation, matcher and loss weights) comes from the checkpoint's training ``args`` when it has
them, else from the official defaults. The checkpoint code reaches these through
:func:`read_official`; method files know nothing of them.

The knowledge every layout shares (COCO's labels, a ResNet's depth from its keys, the
training arguments' loss weights) is in ``qdet.weights.layouts``; DINO's readers, official
and detrex's, in ``qdet.weights.official_dino``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from ..models import anchor_detr, conditional_detr, deformable_detr, detr, sparse_rcnn
from .layouts import (
    count_layers,
    d2_to_torchvision,
    drop_profiler_keys,
    loss_from_args,
    official_dilation,
    rename_backbone,
    resnet_from_keys,
)
from .official_dino import (
    detrex_dino_convert,
    detrex_dino_is_layout,
    dino_convert,
    dino_is_official,
)

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
    return cfg, rename_backbone(sd)


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
    return cfg, rename_backbone(sd)


# ------------------------------------------------------ fundamentalvision/Deformable-DETR


def deformable_is_official(sd: dict) -> bool:
    return ("backbone.0.body.conv1.weight" in sd and "transformer.level_embed" in sd
            and "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in sd
            and "transformer.tgt_embed.weight" not in sd)          # (DINO's has one)


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
    return cfg, rename_backbone(drop_profiler_keys(state))


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
    return cfg, drop_profiler_keys(sd)


# ------------------------------------------------- PeizeSun/SparseR-CNN (detectron2)


def sparse_rcnn_is_official(sd: dict) -> bool:
    return "init_proposal_boxes.weight" in sd and "backbone.bottom_up.stem.conv1.weight" in sd


def sparse_rcnn_convert(sd: dict, args: dict) -> tuple[sparse_rcnn.Config, dict]:
    state = {d2_to_torchvision(k, "backbone.bottom_up."): v for k, v in sd.items()
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
    "dino": OfficialFormat(dino_is_official, dino_convert),
}
# layouts of the same architectures from other code bases (detrex's DINO releases)
OTHER_LAYOUTS: dict[str, OfficialFormat] = {
    "dino": OfficialFormat(detrex_dino_is_layout, detrex_dino_convert),
}


def _layout(sd: dict) -> tuple[str, OfficialFormat] | None:
    for table in (FORMATS, OTHER_LAYOUTS):
        for arch, f in table.items():
            if f.is_official(sd):
                return arch, f
    return None


def official_arch(sd: dict) -> str | None:
    """Which architecture's release layout (official, or detrex's) ``sd`` is in, if any."""
    found = _layout(sd)
    return found[0] if found else None


def read_official(sd: dict, args: dict) -> tuple[str, object, dict]:
    """An official state dict and its ``args`` -> ``(arch, Config, qdet state dict)``; raises
    ValueError when the layout is no known release's."""
    found = _layout(sd)
    if found is None:
        raise ValueError(f"the state dict's keys match no architecture's official layout "
                         f"(first keys: {list(sd)[:4]})")
    arch, layout = found
    cfg, state = layout.convert(sd, args)
    return arch, cfg, state
