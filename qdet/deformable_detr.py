"""Deformable DETR: Deformable Transformers for End-to-End Object Detection (Zhu et al.,
ICLR 2021). https://arxiv.org/abs/2010.04159

What differs from DETR:
- Multi-scale features: backbone C3-C5 plus one extra stride-2 level (4 levels), each
  projected to the model width with GroupNorm; a learned level embedding is added to the
  sine position encoding (which here counts pixel centres: offset -0.5).
- Attention samples a few points around a reference point per head and level (multi-scale
  deformable attention, ``qdet.deform_attn``), in the encoder (reference = each pixel's
  centre, corrected for padding by the valid ratios) and in the decoder's cross-attention
  (reference = sigmoid of a linear layer on the query's positional half). Decoder
  self-attention stays standard. Layers are post-norm; there is no final decoder norm.
- ``with_box_refine``: each decoder layer's own box head refines the reference box, detached
  between layers. ``two_stage``: the encoder scores every position as a proposal
  (object-vs-background, ``enc_outputs``), and the top-k proposals become the decoder's
  reference boxes and, through their sine embedding, its queries (needs box refinement,
  as in the official code).
- Sigmoid focal loss with the focal class cost, top-100 over queries x classes at inference.

Module names follow the official repository, so its checkpoints load after renaming the
backbone prefix and dropping the decoder's aliases of the shared heads (``official_config``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import FROM_SCRATCH, Backbone
from .base import Detector, MLP, batch_images, box_from_reference, layer_outputs, resize_mask
from .deform_attn import MSDeformAttn
from .detr import count_layers, official_dilation, resnet_from_keys
from .engine import SHAPES_TRAIN
from .matcher import LossConfig, focal_loss_config, loss_from_args
from .position_encoding import sine_embed_points, sine_position_embedding


@dataclass
class Config:
    """Deformable DETR (R50, 4 levels) as in the paper; SHAPES overrides it for the
    built-in data."""
    num_classes: int = 91
    backbone: str = "resnet50"
    dilation: bool = False
    frozen_bn: bool = True
    backbone_trainable: int = 3
    num_feature_levels: int = 4
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    loss: LossConfig = field(default_factory=focal_loss_config)


# ------------------------------------------------------------------------- layers


class EncoderLayer(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d, levels, heads, points)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, src, pos, ref, shapes, pad):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, ref, src, shapes, pad)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention, FFN (post-norm; the official names
    norm2/norm1/norm3 follow that order)."""

    def __init__(self, d: int, ffn: int, dropout: float, levels: int, heads: int, points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d, levels, heads, points)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.dropout1, self.dropout2, self.dropout3, self.dropout4 = (
            nn.Dropout(dropout) for _ in range(4))

    def forward(self, tgt, query_pos, ref, memory, shapes, pad):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norm1(tgt + self.dropout1(
            self.cross_attn(tgt + query_pos, ref, memory, shapes, pad)))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels,
                         cfg.nheads, cfg.enc_n_points) for _ in range(cfg.enc_layers))

    @staticmethod
    def reference_points(shapes, valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalized by the valid (unpadded) extent of their
        level, then expressed in every level's frame: ``[B, S, L, 2]`` (x, y)."""
        refs = []
        dev, dt = valid_ratios.device, valid_ratios.dtype
        for lvl, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dt, device=dev),
                                    torch.linspace(0.5, w - 0.5, w, dtype=dt, device=dev),
                                    indexing="ij")
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((xs, ys), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, shapes, valid_ratios, pad):
        ref = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes, pad)
        return src


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.d_model, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels,
                         cfg.nheads, cfg.dec_n_points) for _ in range(cfg.dec_layers))

    def forward(self, tgt, query_pos, ref, memory, shapes, valid_ratios, pad, bbox_embed=None):
        """Returns every layer's output ``[L,B,Q,d]`` and the reference after each layer
        ``[L,B,Q,2|4]`` (refined by ``bbox_embed[i]`` when given, detached between layers)."""
        hs, refs = [], []
        for i, layer in enumerate(self.layers):
            if ref.shape[-1] == 4:
                ref_in = ref[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_in = ref[:, :, None] * valid_ratios[:, None]
            tgt = layer(tgt, query_pos, ref_in, memory, shapes, pad)
            if bbox_embed is not None:
                ref = box_from_reference(bbox_embed[i](tgt), ref).detach()
            hs.append(tgt)
            refs.append(ref)
        return torch.stack(hs), torch.stack(refs)


def valid_ratio(mask: Tensor) -> Tensor:
    """Unpadded fraction of a level's width and height, ``[B, 2]`` (w, h)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def encoder_proposals(memory: Tensor, pad: Tensor, shapes) -> tuple[Tensor, Tensor]:
    """Two-stage proposals: one box per encoder position, centred on it with side
    0.05 * 2^level, in logit space (+inf where padded or too close to the border), and
    the memory with those positions zeroed."""
    n = memory.shape[0]
    props, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        m = pad[:, start:start + h * w].view(n, h, w)
        valid_h = (~m[:, :, 0]).sum(1).to(memory.dtype)
        valid_w = (~m[:, 0, :]).sum(1).to(memory.dtype)
        kw = dict(dtype=memory.dtype, device=memory.device)
        ys, xs = torch.meshgrid(torch.linspace(0, h - 1, h, **kw),
                                torch.linspace(0, w - 1, w, **kw), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None].expand(n, -1, -1, -1)
        grid = (grid + 0.5) / torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
        wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
        props.append(torch.cat([grid, wh], -1).view(n, -1, 4))
        start += h * w
    props = torch.cat(props, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    invalid = pad[..., None] | ~valid
    return props.masked_fill(invalid, float("inf")), memory.masked_fill(invalid, 0.0)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        if cfg.two_stage:
            self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            self.pos_trans, self.pos_trans_norm = nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d)
        else:
            self.reference_points = nn.Linear(d, 2)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not cfg.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs, masks, pos, query_embed, class_embed, bbox_embed):
        """Returns (hs [L,B,Q,d], initial reference, references after each layer,
        encoder outputs or None)."""
        shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)          # [B,S,d]
        pad = torch.cat([m.flatten(1) for m in masks], 1)                         # [B,S]
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i]
                         for i, p in enumerate(pos)], 1)
        ratios = torch.stack([valid_ratio(m) for m in masks], 1)                  # [B,L,2]
        memory = self.encoder(src, pos, shapes, ratios, pad)
        b, d = memory.shape[0], memory.shape[2]
        enc = None
        if self.cfg.two_stage:
            props, out_mem = encoder_proposals(memory, pad, shapes)
            out_mem = self.enc_output_norm(self.enc_output(out_mem))
            enc_logits = class_embed[self.cfg.dec_layers](out_mem)
            enc_coords = bbox_embed[self.cfg.dec_layers](out_mem) + props         # logit space
            enc = {"pred_logits": enc_logits, "pred_boxes": enc_coords.sigmoid()}
            top = enc_logits[..., 0].topk(self.cfg.num_queries, dim=1)[1]
            coords = torch.gather(enc_coords, 1, top[..., None].expand(-1, -1, 4)).detach()
            ref = coords.sigmoid()
            emb = sine_embed_points(ref, d // 2, y_first=False)
            query_pos, tgt = self.pos_trans_norm(self.pos_trans(emb)).split(d, dim=-1)
        else:
            query_pos, tgt = query_embed.split(d, dim=-1)
            query_pos = query_pos[None].expand(b, -1, -1)
            tgt = tgt[None].expand(b, -1, -1)
            ref = self.reference_points(query_pos).sigmoid()
        refiner = bbox_embed if self.cfg.with_box_refine else None
        hs, refs = self.decoder(tgt, query_pos, ref, memory, shapes, ratios, pad, refiner)
        return hs, ref, refs, enc


# -------------------------------------------------------------------------- model


class DeformableDETR(Detector):
    arch = "deformable"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.two_stage and not cfg.with_box_refine:
            raise ValueError("two_stage needs with_box_refine (as in the official code): "
                             "set both")
        d = cfg.d_model
        self.backbone, self.input_proj = self.make_inputs(cfg)
        self.transformer = Transformer(cfg)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)
        class_head, box_head = nn.Linear(d, cfg.num_classes), MLP(d, d, 4, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior prob 0.01
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        n_pred = cfg.dec_layers + (1 if cfg.two_stage else 0)
        if cfg.with_box_refine:  # one head per layer (as the official code's init)
            self.class_embed = nn.ModuleList(_clone(class_head) for _ in range(n_pred))
            self.bbox_embed = nn.ModuleList(_clone(box_head) for _ in range(n_pred))
            for j, head in enumerate(self.bbox_embed):
                if j > 0 or cfg.two_stage:
                    nn.init.zeros_(head.layers[-1].bias[2:])
        else:  # one head shared by every layer
            self.class_embed = nn.ModuleList([class_head] * n_pred)
            self.bbox_embed = nn.ModuleList([box_head] * n_pred)

    @staticmethod
    def make_inputs(cfg) -> tuple[Backbone, nn.ModuleList]:
        """The multi-scale backbone and the per-level projections to the model width."""
        d, levels = cfg.d_model, cfg.num_feature_levels
        stages = (2, 3, 4)[-min(levels, 3):]  # C5 alone, C4-C5, or C3-C5 (+ extra levels)
        backbone = Backbone(cfg.backbone, stages, cfg.dilation, cfg.frozen_bn,
                            cfg.backbone_trainable)
        chans = backbone.channels
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in chans]
        for i in range(levels - len(chans)):  # extra levels: stride-2 3x3 convs
            proj.append(nn.Sequential(nn.Conv2d(chans[-1] if i == 0 else d, d, 3, 2, 1),
                                      nn.GroupNorm(32, d)))
        for p in proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)
        return backbone, nn.ModuleList(proj)

    def features(self, images):
        """Projected multi-scale maps, their padding masks and position encodings."""
        x, mask = batch_images(images)
        feats = self.backbone(x, mask)
        srcs = [proj(f) for proj, (f, _) in zip(self.input_proj, feats)]
        masks = [m for _, m in feats]
        for i in range(len(feats), len(self.input_proj)):
            srcs.append(self.input_proj[i](feats[-1][0] if i == len(feats) else srcs[-1]))
            masks.append(resize_mask(mask, srcs[-1].shape[-2:]))
        pos = [sine_position_embedding(m, self.config.d_model // 2, offset=-0.5).to(s.dtype)
               for s, m in zip(srcs, masks)]
        return srcs, masks, pos

    def forward(self, images) -> dict:
        srcs, masks, pos = self.features(images)
        query = None if self.config.two_stage else self.query_embed.weight
        hs, ref0, refs, enc = self.transformer(srcs, masks, pos, query, self.class_embed,
                                               self.bbox_embed)
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            ref = ref0 if lvl == 0 else refs[lvl - 1]
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(box_from_reference(self.bbox_embed[lvl](hs[lvl]), ref))
        logits, boxes = torch.stack(logits), torch.stack(boxes)
        out = layer_outputs(logits, boxes, self.config.aux_loss)
        if enc is not None:
            out["enc_outputs"] = enc
        return out


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


Model = DeformableDETR

# ---------------------------------------------------------------- official checkpoints


def is_official(sd: dict) -> bool:
    return ("backbone.0.body.conv1.weight" in sd and "transformer.level_embed" in sd
            and "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in sd)


def official_config(sd: dict, args: dict) -> tuple[Config, dict]:
    """fundamentalvision/Deformable-DETR checkpoint (plain, box refinement, two-stage,
    single-scale) -> (Config, qdet state dict). Sizes come from the tensors; heads, points
    split, dilation and query count (two-stage) from ``args`` when present, else defaults."""
    levels, d = sd["transformer.level_embed"].shape
    heads = int(args.get("nheads", 8))

    def points(prefix):
        return sd[f"{prefix}.attention_weights.weight"].shape[0] // (levels * heads)

    two_stage = "transformer.enc_output.weight" in sd
    refine_ = "transformer.decoder.bbox_embed.0.layers.0.weight" in sd
    queries = (sd["query_embed.weight"].shape[0] if "query_embed.weight" in sd
               else int(args.get("num_queries", 300)))
    cfg = Config(
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
    out = {}
    for k, v in sd.items():
        if re.match(r"transformer\.decoder\.(bbox|class)_embed\.", k):
            continue  # aliases of the top-level heads
        if k.endswith(("total_params", "total_ops")):
            continue  # profiler leftovers in some official checkpoints
        out[re.sub(r"^backbone\.0\.", "backbone.", k)] = v
    return cfg, out


# ------------------------------------------------------------------------- presets

PAPER = dict(train=dict(lr=2e-4, lr_backbone=2e-5, lr_slow_names=("reference_points",
                                                                  "sampling_offsets"),
                        lr_slow_mult=0.1, weight_decay=1e-4, batch_size=2, epochs=50,
                        lr_drops=(40,), clip_max_norm=0.1))

SHAPES = dict(
    model=dict(**FROM_SCRATCH, num_feature_levels=3, d_model=128, nheads=8, enc_layers=3,
               dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=20),
    train=dict(SHAPES_TRAIN, lr_slow_names=("reference_points", "sampling_offsets"),
               lr_slow_mult=0.1),
)
