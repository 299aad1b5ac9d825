"""DINO's released checkpoints: the official repository's layout (IDEA-Research/DINO) and
detrex's (IDEA-Research/detrex, whose DINO releases are direct downloads).

Official: a torch checkpoint ``{"model": state dict, "args": argparse.Namespace, ...}``. The
decoder's shared class and box heads appear under every layer's name twice (``class_embed.i``
and ``transformer.decoder.class_embed.i``, one tensor): qdet keeps ``class_embed.i``. The
denoising label embedding ``label_enc`` has ``dn_labelbook_size + 1`` rows; the rows past the
classes are never used by DINO's denoising (labels are class indices) and are dropped. What
the shapes do not tell (heads, the feature encoding's temperature, top-k, denoising
settings) comes from ``args``, else the official config's values.

detrex: detectron2's ResNet names, ``neck.*`` for the input projections, ``attentions.N`` /
``ffns`` / ``norms.N`` inside the layers, seven separate heads (the last is the encoder
proposals'), 80 contiguous COCO classes, and a feature encoding of temperature 10000 with
offset -0.5 (the config differences are in ``qdet.models.dino``'s docstring).
"""
from __future__ import annotations

import re

import torch

from ..blocks.denoising import DNConfig
from ..models import dino
from .layouts import (
    count_layers,
    d2_to_torchvision,
    drop_profiler_keys,
    loss_from_args,
    official_dilation,
    rename_backbone,
    resnet_from_keys,
)


def _dn(args: dict, enabled: bool) -> dict:
    """DINO's denoising settings from its ``args`` (label noise ratio r flips a label with
    probability r / 2, possibly to itself; qdet's label_noise is the probability it changes)."""
    if not enabled:
        return {"queries": 0}
    return {"queries": int(args.get("dn_number", 100)),
            "label_noise": float(args.get("dn_label_noise_ratio", 0.5)) * 0.5,
            "box_noise": float(args.get("dn_box_noise_scale", 0.4)),
            "contrastive": True, "noise": "corners"}


def _shared(sd: dict, prefix: str, layers: int) -> bool:
    """Whether the decoder's heads are one module (equal tensors under every index)."""
    return all(torch.equal(sd[f"{prefix}.0.weight"], sd[f"{prefix}.{i}.weight"])
               for i in range(1, layers))


# ---------------------------------------------------------------- IDEA-Research/DINO


def dino_is_official(sd: dict) -> bool:
    return ("backbone.0.body.conv1.weight" in sd and "transformer.tgt_embed.weight" in sd
            and "transformer.enc_out_class_embed.weight" in sd)


def dino_convert(sd: dict, args: dict) -> tuple[dino.Config, dict]:
    if args.get("two_stage_type", "standard") != "standard" or \
            not args.get("embed_init_tgt", True):
        raise ValueError("this DINO checkpoint uses a query selection other than the paper's "
                         "mixed one (two_stage_type 'standard', embed_init_tgt); qdet reads "
                         "the released models")
    levels, d = sd["transformer.level_embed"].shape
    heads = int(args.get("nheads", 8))
    layers = count_layers(sd, "transformer.decoder.layers.")
    num_classes = sd["class_embed.0.weight"].shape[0]
    backbone_levels = sum(1 for k in sd if re.fullmatch(r"input_proj\.\d+\.0\.weight", k)
                          and sd[k].shape[-1] == 1)
    if levels - backbone_levels != 1 and levels > 3:
        raise ValueError(f"this DINO checkpoint has {levels} levels from {backbone_levels} "
                         "backbone stages; qdet reads one extra level (DINO-4scale, 5scale)")

    def points(prefix):
        return sd[f"{prefix}.attention_weights.weight"].shape[0] // (levels * heads)

    cfg = dino.Config(
        num_classes=num_classes, backbone=resnet_from_keys(sd, "backbone.0.body."),
        dilation=official_dilation(args), num_feature_levels=levels, d_model=d,
        nheads=heads, enc_layers=count_layers(sd, "transformer.encoder.layers."),
        dec_layers=layers,
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        enc_n_points=points("transformer.encoder.layers.0.self_attn"),
        dec_n_points=points("transformer.decoder.layers.0.cross_attn"),
        num_queries=sd["transformer.tgt_embed.weight"].shape[0],
        num_select=int(args.get("num_select", 300)),
        share_heads=bool(args.get("dec_pred_class_embed_share",
                                  _shared(sd, "class_embed", layers))),
        pe_temperature=float(args.get("pe_temperatureH", 20)),
        loss=loss_from_args({"cls_loss_coef": 1.0, **args}, focal=True),
        dn=DNConfig(**_dn(args, "label_enc.weight" in sd and args.get("use_dn", True))))
    state = {k: v for k, v in drop_profiler_keys(sd).items()
             if not re.match(r"transformer\.decoder\.(bbox|class)_embed\.", k)}
    label = state.pop("label_enc.weight", None)
    if cfg.dn.enabled:
        state["dn_label.weight"] = label[:num_classes]
    return cfg, rename_backbone(state)


# ------------------------------------------------------------------- detrex's DINO


def detrex_dino_is_layout(sd: dict) -> bool:
    return "transformer.level_embeds" in sd and "transformer.tgt_embed.weight" in sd


# inside transformer.{encoder,decoder}.layers.N: detrex's names -> the official ones
_DETREX_LAYER = {
    "encoder": [(r"attentions\.0\.", "self_attn."), (r"norms\.0\.", "norm1."),
                (r"norms\.1\.", "norm2.")],
    "decoder": [(r"attentions\.0\.attn\.", "self_attn."), (r"attentions\.1\.", "cross_attn."),
                (r"norms\.0\.", "norm2."), (r"norms\.1\.", "norm1."), (r"norms\.2\.", "norm3.")],
}
_FFN = [(r"ffns\.0\.layers\.0\.0\.", "linear1."), (r"ffns\.0\.layers\.1\.", "linear2.")]


def _detrex_key(k: str, dec_layers: int) -> str | None:
    k = d2_to_torchvision(k, "backbone.")
    if re.match(r"transformer\.decoder\.(bbox|class)_embed\.", k):
        return None                                        # aliases of the top-level heads
    k = re.sub(r"^neck\.convs\.(\d+)\.conv\.", r"input_proj.\1.0.", k)
    k = re.sub(r"^neck\.convs\.(\d+)\.norm\.", r"input_proj.\1.1.", k)
    m = re.match(r"^(class|bbox)_embed\.(\d+)\.(.*)", k)
    if m and int(m.group(2)) == dec_layers:                # the encoder proposals' head
        return f"transformer.enc_out_{m.group(1)}_embed.{m.group(3)}"
    k = k.replace("transformer.level_embeds", "transformer.level_embed")
    m = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.*)", k)
    if not m:
        return k
    part, i, rest = m.groups()
    for pattern, new in _DETREX_LAYER[part] + _FFN:
        rest = re.sub("^" + pattern, new, rest)
    return f"transformer.{part}.layers.{i}.{rest}"


def detrex_dino_convert(sd: dict, args: dict) -> tuple[dino.Config, dict]:
    extra = [k for k in sd if k.startswith("neck.extra_convs.")]
    backbone_levels = count_layers(sd, "neck.convs.")
    state = {}
    for k, v in sd.items():
        if k.startswith(("pixel_mean", "pixel_std")):
            continue
        k = re.sub(r"^neck\.extra_convs\.0\.(conv|norm)\.",
                   lambda m: f"input_proj.{backbone_levels}.{'0' if m.group(1) == 'conv' else '1'}.",
                   k) if k in extra else k
        new = _detrex_key(k, count_layers(sd, "transformer.decoder.layers."))
        if new is not None:
            state[new] = v
    levels, d = state["transformer.level_embed"].shape
    layers = count_layers(state, "transformer.decoder.layers.")
    heads = int(args.get("nheads", 8))
    num_classes = state["class_embed.0.weight"].shape[0]

    def points(prefix):
        return state[f"{prefix}.attention_weights.weight"].shape[0] // (levels * heads)

    cfg = dino.Config(
        num_classes=num_classes, backbone=resnet_from_keys(state, "backbone.body."),
        num_feature_levels=levels, d_model=d, nheads=heads,
        enc_layers=count_layers(state, "transformer.encoder.layers."), dec_layers=layers,
        dim_feedforward=state["transformer.encoder.layers.0.linear1.weight"].shape[0],
        enc_n_points=points("transformer.encoder.layers.0.self_attn"),
        dec_n_points=points("transformer.decoder.layers.0.cross_attn"),
        num_queries=state["transformer.tgt_embed.weight"].shape[0],
        share_heads=_shared(state, "class_embed", layers), pe_temperature=10000.0,
        pe_offset=-0.5, loss=loss_from_args({"cls_loss_coef": 1.0, **args}, focal=True),
        dn=DNConfig(**_dn({**args, "dn_box_noise_scale": 1.0},
                               "label_enc.weight" in state)))
    label = state.pop("label_enc.weight", None)
    if cfg.dn.enabled:
        state["dn_label.weight"] = label[:num_classes]
    return cfg, state
