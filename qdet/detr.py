"""DETR: End-to-End Object Detection with Transformers (Carion et al., ECCV 2020).
https://arxiv.org/abs/2005.12872

A CNN feature map (one level) goes through a transformer encoder; a decoder turns a fixed
set of learned object queries into one prediction each, trained with a set loss over a
Hungarian matching. Sine positional encodings are added to queries and keys in every
attention layer (paper Fig. 10); the decoder starts from zeros; layers are post-norm; every
decoder layer is supervised (auxiliary losses). The first decoder layer's self-attention
only sees zeros and may be skipped (paper appendix, ``skip_first_self_attn``).

The module and parameter names follow the official repository, so its checkpoints load by
renaming the backbone prefix alone (see ``official_config``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import FROM_SCRATCH, Backbone
from .base import Detector, MLP, batch_images, layer_outputs
from .engine import SHAPES_TRAIN
from .matcher import LossConfig, loss_from_args
from .position_encoding import sine_position_embedding


@dataclass
class Config:
    """DETR-R50 as in the paper; the built-in ``shapes`` preset overrides it (see PRESETS)."""
    num_classes: int = 91            # COCO's ids run to 90; label = category id for COCO
    backbone: str = "resnet50"
    backbone_layer: int = 4          # stage feeding the transformer (3 = stride 16)
    dilation: bool = False           # DC5: dilate the last stage instead of striding
    frozen_bn: bool = True
    backbone_trainable: int = 3      # stages from layer4 down that are trained
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    num_queries: int = 100
    aux_loss: bool = True
    skip_first_self_attn: bool = False
    loss: LossConfig = field(default_factory=LossConfig)


class EncoderLayer(nn.Module):
    """Self-attention + FFN; the position encoding is added to queries and keys only."""

    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = (nn.Dropout(dropout) for _ in range(3))
        self.pre_norm = pre_norm

    def ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: Tensor, pos: Tensor, pad: Tensor | None) -> Tensor:
        # src, pos: [B,HW,d]; pad: [B,HW] True on padding
        x = self.norm1(src) if self.pre_norm else src
        q = x + pos
        src = src + self.dropout1(self.self_attn(q, q, x, key_padding_mask=pad,
                                                 need_weights=False)[0])
        if self.pre_norm:
            return src + self.dropout2(self.ffn(self.norm2(src)))
        src = self.norm1(src)
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN."""

    def __init__(self, d: int, nheads: int, ffn: int, dropout: float, pre_norm: bool,
                 self_attn: bool = True):
        super().__init__()
        self.self_attn = (nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
                          if self_attn else None)
        self.multihead_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                pad: Tensor | None) -> Tensor:
        # tgt, query_pos: [B,Q,d]; memory, pos: [B,HW,d]
        if self.self_attn is not None:
            x = self.norm1(tgt) if self.pre_norm else tgt
            q = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, q, x, need_weights=False)[0])
            if not self.pre_norm:
                tgt = self.norm1(tgt)
        x = self.norm2(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout2(self.multihead_attn(
            x + query_pos, memory + pos, memory, key_padding_mask=pad, need_weights=False)[0])
        if not self.pre_norm:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.pre_norm else self.norm3(tgt)


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.pre_norm)
            for _ in range(cfg.enc_layers))
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else None

    def forward(self, src: Tensor, pos: Tensor, pad: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, pad)
        return self.norm(src) if self.norm is not None else src


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.d_model, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.pre_norm,
                         self_attn=not (i == 0 and cfg.skip_first_self_attn))
            for i in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, tgt, memory, pos, query_pos, pad) -> Tensor:
        """Returns the normalized output of every layer, ``[L,B,Q,d]``."""
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, pad)
            hs.append(self.norm(tgt))
        return torch.stack(hs)


class Transformer(nn.Module):
    """DETR's encoder-decoder; the part that ``--compile`` compiles."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query: Tensor, pos: Tensor) -> Tensor:
        # src, pos: [B,d,H,W] -> [B,HW,d]; mask: [B,H,W]; query: [Q,d]
        b = src.shape[0]
        src, pos = src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2)
        pad = mask.flatten(1)
        memory = self.encoder(src, pos, pad)
        query = query[None].expand(b, -1, -1)
        return self.decoder(torch.zeros_like(query), memory, pos, query, pad)


class DETR(Detector):
    arch = "detr"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.backbone = Backbone(cfg.backbone, (cfg.backbone_layer,), cfg.dilation,
                                 cfg.frozen_bn, cfg.backbone_trainable)
        self.input_proj = nn.Conv2d(self.backbone.channels[-1], cfg.d_model, kernel_size=1)
        self.transformer = Transformer(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.d_model)
        self.class_embed = nn.Linear(cfg.d_model, cfg.num_classes + 1)
        self.bbox_embed = MLP(cfg.d_model, cfg.d_model, 4, 3)

    def forward(self, images) -> dict:
        x, mask = batch_images(images)
        (feat, mask), = self.backbone(x, mask)
        pos = sine_position_embedding(mask, self.config.d_model // 2).to(feat.dtype)
        hs = self.transformer(self.input_proj(feat), mask, self.query_embed.weight, pos)
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()  # [L,B,Q,*]
        return layer_outputs(logits, boxes, self.config.aux_loss)


Model = DETR

# ---------------------------------------------------------------- official checkpoints


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


def is_official(sd: dict) -> bool:
    return ("backbone.0.body.conv1.weight" in sd and "query_embed.weight" in sd
            and "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in sd)


def official_config(sd: dict, args: dict) -> tuple[Config, dict]:
    """facebookresearch/detr checkpoint -> (Config, qdet state dict).

    Sizes come from the tensors; what shapes cannot tell (heads, dilation, loss weights)
    comes from the checkpoint's ``args`` when present, else the paper's defaults.
    """
    if "backbone.1.row_embed.weight" in sd or args.get("position_embedding") == "learned":
        raise ValueError("this DETR checkpoint uses learned position embeddings; "
                         "qdet implements the sine encoding of the released models")
    if any(k.startswith("bbox_attention.") or k.startswith("detr.") for k in sd):
        raise ValueError("this is a DETR segmentation checkpoint; qdet loads detection models")
    d = sd["query_embed.weight"].shape[1]
    cfg = Config(
        num_classes=sd["class_embed.weight"].shape[0] - 1,
        backbone=resnet_from_keys(sd, "backbone.0.body."),
        dilation=official_dilation(args),
        d_model=d,
        nheads=int(args.get("nheads", 8)),
        enc_layers=count_layers(sd, "transformer.encoder.layers."),
        dec_layers=count_layers(sd, "transformer.decoder.layers."),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        pre_norm="transformer.encoder.norm.weight" in sd,
        num_queries=sd["query_embed.weight"].shape[0],
        loss=loss_from_args(args, focal=False),
    )
    out = {re.sub(r"^backbone\.0\.", "backbone.", k): v for k, v in sd.items()}
    return cfg, out


# ------------------------------------------------------------------------- presets

# Paper training recipe (COCO, 8 GPUs x 2 images): lr 1e-4, backbone 1e-5, 500 epochs.
PAPER = dict(train=dict(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, batch_size=2,
                        epochs=500, lr_drops=(400,), clip_max_norm=0.1))

# From scratch on the built-in shapes data in ~10 CPU minutes: see README "Presets".
SHAPES = dict(
    model=dict(**FROM_SCRATCH, backbone_layer=3, d_model=128, nheads=8, enc_layers=3, dec_layers=3,
               dim_feedforward=512, dropout=0.0, num_queries=20),
    train=dict(SHAPES_TRAIN, epochs=10),
)
